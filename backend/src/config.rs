//! The daemon's configuration, parsed and checked before anything starts.
//!
//! Command-line values arrive as strings; this module turns them into a
//! [`virtio_iommu::DeviceConfig`] and an endpoint list, or into an error that
//! says which flag is wrong and why (QEMU's backend program conventions: a
//! daemon that cannot start says so on stderr and exits non-zero).

use virtio_iommu::DeviceConfig;

/// A bad command-line value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{flag}: `{value}` is not a number (decimal or 0x-prefixed hex)")]
    NotANumber { flag: &'static str, value: String },
    #[error("{flag}: `{value}` is not a range A-B")]
    NotARange { flag: &'static str, value: String },
    #[error("{flag}: range {start:#x}-{end:#x} is empty (start > end)")]
    EmptyRange {
        flag: &'static str,
        start: u64,
        end: u64,
    },
    #[error("{flag}: {value:#x} does not fit in 32 bits")]
    TooLarge { flag: &'static str, value: u64 },
    #[error("--page-size-mask: {0:#x} has no page size (must be non-zero)")]
    NoPageSize(u64),
    #[error("--endpoints: no endpoint given")]
    NoEndpoints,
    #[error("--endpoints: {0} endpoints is more than the 65536 a PCI segment has")]
    TooManyEndpoints(u64),
    #[error("--probe-size: {0} is not a multiple of 4 between 64 and 4096")]
    BadProbeSize(u32),
    #[error("--msi-window {start:#x}-{end:#x} is outside --input-range")]
    MsiOutsideInput { start: u64, end: u64 },
    #[error("--mode iommufd is not available yet (pass-through comes with iommufd support); use --mode emulated")]
    IommufdUnavailable,
}

/// Parse a number, decimal or `0x` hex.
pub fn parse_u64(flag: &'static str, s: &str) -> Result<u64, ConfigError> {
    let s = s.trim();
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
        None => s.replace('_', "").parse(),
    };
    r.map_err(|_| ConfigError::NotANumber {
        flag,
        value: s.to_string(),
    })
}

/// Parse an inclusive range `A-B`.
pub fn parse_range(flag: &'static str, s: &str) -> Result<(u64, u64), ConfigError> {
    let (a, b) = s.split_once('-').ok_or_else(|| ConfigError::NotARange {
        flag,
        value: s.to_string(),
    })?;
    let (start, end) = (parse_u64(flag, a)?, parse_u64(flag, b)?);
    if start > end {
        return Err(ConfigError::EmptyRange { flag, start, end });
    }
    Ok((start, end))
}

fn to_u32(flag: &'static str, v: u64) -> Result<u32, ConfigError> {
    u32::try_from(v).map_err(|_| ConfigError::TooLarge { flag, value: v })
}

/// Parse an endpoint list: comma-separated IDs and inclusive ranges, e.g.
/// `0-0xff,0x100`. Sorted, without duplicates.
pub fn parse_endpoints(s: &str) -> Result<Vec<u32>, ConfigError> {
    const FLAG: &str = "--endpoints";
    let mut v = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (start, end) = if item.contains('-') {
            parse_range(FLAG, item)?
        } else {
            let n = parse_u64(FLAG, item)?;
            (n, n)
        };
        let (start, end) = (to_u32(FLAG, start)?, to_u32(FLAG, end)?);
        let count = u64::from(end - start) + 1 + v.len() as u64;
        if count > 0x1_0000 {
            return Err(ConfigError::TooManyEndpoints(count));
        }
        v.extend(start..=end);
    }
    v.sort_unstable();
    v.dedup();
    if v.is_empty() {
        return Err(ConfigError::NoEndpoints);
    }
    Ok(v)
}

/// Command-line values, as strings, before checking.
#[derive(Debug, Clone, Default)]
pub struct RawConfig {
    pub endpoints: Option<String>,
    pub page_size_mask: Option<String>,
    pub input_range: Option<String>,
    pub domain_range: Option<String>,
    pub msi_window: Option<String>,
    pub probe_size: Option<u32>,
    /// Boot bypass; `None` = on, as QEMU's own virtio-iommu (`boot-bypass`).
    pub bypass: Option<bool>,
}

/// A checked configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub device: DeviceConfig,
    pub endpoints: Vec<u32>,
}

impl RawConfig {
    /// Check every value; defaults are [`DeviceConfig::default`] with boot
    /// bypass on, and every PCI requester ID (`0-0xffff`) as an endpoint.
    pub fn check(&self) -> Result<Config, ConfigError> {
        let mut device = DeviceConfig::default();
        if let Some(s) = &self.page_size_mask {
            device.page_size_mask = parse_u64("--page-size-mask", s)?;
            if device.page_size_mask == 0 {
                return Err(ConfigError::NoPageSize(0));
            }
        }
        if let Some(s) = &self.input_range {
            device.input_range = parse_range("--input-range", s)?;
        }
        if let Some(s) = &self.domain_range {
            let (a, b) = parse_range("--domain-range", s)?;
            device.domain_range = (to_u32("--domain-range", a)?, to_u32("--domain-range", b)?);
        }
        if let Some(s) = &self.msi_window {
            device.msi_window = parse_range("--msi-window", s)?;
        }
        let (ms, me) = device.msi_window;
        let (is, ie) = device.input_range;
        if ms < is || me > ie {
            return Err(ConfigError::MsiOutsideInput { start: ms, end: me });
        }
        if let Some(p) = self.probe_size {
            if !(64..=4096).contains(&p) || !p.is_multiple_of(4) {
                return Err(ConfigError::BadProbeSize(p));
            }
            device.probe_size = p;
        }
        // Firmware and early boot DMA must work before the guest's driver
        // runs: bypass at power-on, as QEMU's virtio-iommu does by default.
        device.bypass = self.bypass.unwrap_or(true);
        let endpoints = parse_endpoints(self.endpoints.as_deref().unwrap_or("0-0xffff"))?;
        Ok(Config { device, endpoints })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_decimal_or_hex() {
        assert_eq!(parse_u64("f", "4096"), Ok(4096));
        assert_eq!(parse_u64("f", "0xfee0_0000"), Ok(0xfee0_0000));
        assert!(matches!(
            parse_u64("f", "12k"),
            Err(ConfigError::NotANumber { .. })
        ));
    }

    #[test]
    fn ranges_are_inclusive_and_not_empty() {
        assert_eq!(parse_range("r", "0-0xffff"), Ok((0, 0xffff)));
        assert!(matches!(
            parse_range("r", "5-4"),
            Err(ConfigError::EmptyRange { .. })
        ));
        assert!(matches!(
            parse_range("r", "5"),
            Err(ConfigError::NotARange { .. })
        ));
    }

    #[test]
    fn endpoint_lists_mix_ids_and_ranges() {
        assert_eq!(
            parse_endpoints("8, 0x10-0x12,8"),
            Ok(vec![8, 0x10, 0x11, 0x12])
        );
        assert_eq!(parse_endpoints(""), Err(ConfigError::NoEndpoints));
        assert!(matches!(
            parse_endpoints("0-0x1ffff"),
            Err(ConfigError::TooManyEndpoints(_))
        ));
        assert!(matches!(
            parse_endpoints("0x1_0000_0000"),
            Err(ConfigError::TooLarge { .. })
        ));
    }

    #[test]
    fn defaults_cover_every_requester_id() {
        let c = RawConfig::default().check().unwrap();
        assert_eq!(c.endpoints.len(), 0x1_0000);
        assert_eq!(
            c.device,
            DeviceConfig {
                bypass: true,
                ..DeviceConfig::default()
            }
        );
    }

    #[test]
    fn bad_values_name_their_flag() {
        let raw = RawConfig {
            msi_window: Some("0xfee00000-0xfeefffff".into()),
            input_range: Some("0-0xffff_ffff".into()),
            probe_size: Some(30),
            ..Default::default()
        };
        assert_eq!(raw.check(), Err(ConfigError::BadProbeSize(30)));
        let raw = RawConfig {
            input_range: Some("0-0xffff".into()),
            ..Default::default()
        };
        assert!(matches!(
            raw.check(),
            Err(ConfigError::MsiOutsideInput { .. })
        ));
        let raw = RawConfig {
            page_size_mask: Some("0".into()),
            ..Default::default()
        };
        assert_eq!(raw.check(), Err(ConfigError::NoPageSize(0)));
    }
}
