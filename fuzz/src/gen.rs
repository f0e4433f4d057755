// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The input source: a seeded SplitMix64 stream with helpers that favour
//! boundary values. An input is fully determined by `(seed, index)`, so a
//! finding is replayed with `vui-fuzz --seed S --target T --replay I`.

/// A deterministic stream of choices.
#[derive(Clone, Debug)]
pub struct Gen {
    state: u64,
}

/// The seed of input `index` of a run seeded with `seed`.
pub fn input_seed(seed: u64, index: u64) -> u64 {
    let mut g = Gen::new(seed ^ index.wrapping_mul(0xd134_2543_de82_ef95));
    g.next_u64()
}

impl Gen {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// SplitMix64 (Steele, Lea, Flood 2014).
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn u32(&mut self) -> u32 {
        self.next_u64() as u32
    }

    pub fn u8(&mut self) -> u8 {
        self.next_u64() as u8
    }

    /// Uniform in `0..n` (`n > 0`; the bias of the modulo is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        match (hi - lo).checked_add(1) {
            Some(n) => lo + self.below(n),
            None => self.next_u64(),
        }
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    pub fn bool(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.fill(&mut v);
        v
    }

    /// Up to `max - 1` arbitrary bytes.
    pub fn bytes_upto(&mut self, max: u64) -> Vec<u8> {
        let n = self.below(max) as usize;
        self.bytes(n)
    }

    /// A 64-bit value from the edges of things: 0, 1, all ones, powers of
    /// two and their neighbours, page multiples, or anything.
    pub fn edgy_u64(&mut self) -> u64 {
        match self.below(8) {
            0 => self.pick(&[
                0,
                1,
                u64::MAX,
                u64::MAX - 1,
                1 << 63,
                (1 << 48) - 1,
                1 << 48,
            ]),
            1 => {
                let p = 1u64 << self.below(64);
                match self.below(3) {
                    0 => p,
                    1 => p - 1,
                    _ => p.wrapping_add(1),
                }
            }
            2 => self.below(1 << 20) << 12,
            3 => u64::MAX - self.below(1 << 16),
            4 => self.below(0x10000),
            _ => self.next_u64(),
        }
    }

    /// A 32-bit value from the edges of things.
    pub fn edgy_u32(&mut self) -> u32 {
        match self.below(4) {
            0 => self.pick(&[0, 1, u32::MAX, u32::MAX - 1, 1 << 31]),
            1 => self.below(16) as u32,
            _ => self.u32(),
        }
    }
}
