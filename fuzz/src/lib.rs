// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A fuzz harness on stable Rust (issue 11, "Hostile input, systematically").
//!
//! Every target takes its input from a [`gen::Gen`] seeded by `(seed,
//! index)`, so each input can be replayed alone. A target returns `Err` with
//! a description when it sees a divergence (the code under test disagrees
//! with a reference, or breaks an invariant); the driver ([`run`]) counts
//! panics (caught per input), hangs (an input that outlives its limit) and
//! divergences.
//!
//! The targets:
//! - [`request`]: `Device::handle_request` with arbitrary request bytes and
//!   reply lengths over the IOAS model;
//! - [`chain`]: the daemon's descriptor-chain reader over arbitrary
//!   descriptor tables in guest memory;
//! - [`ioas`]: arbitrary `Iommufd` operation sequences on the model against
//!   a page-by-page reference;
//! - [`ram_bound`]: the pass-through shape of the device (identity IOAS) over
//!   the model: no IOAS area ever points outside guest RAM;
//! - [`vhost_user`]: arbitrary vhost-user message sequences (with files) to
//!   a daemon process;
//! - [`mirror`]: arbitrary mirror-protocol messages (with files) to a daemon
//!   process from QEMU's side;
//! - [`control`]: arbitrary bytes and commands to a daemon process's control
//!   socket from a hostile local client.

pub mod chain;
pub mod control;
pub mod daemon;
pub mod gen;
pub mod ioas;
pub mod mirror;
pub mod ram_bound;
pub mod request;
pub mod vhost_user;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use gen::Gen;

/// A divergence: what disagreed, in words.
pub type Verdict = Result<(), String>;

/// The targets, by name.
pub const TARGETS: [&str; 7] = [
    "request",
    "chain",
    "ioas",
    "ram-bound",
    "vhost-user",
    "mirror",
    "control",
];

/// How long one input may take before it counts as a hang. Daemon targets
/// wait on sockets with their own timeouts (a few seconds), so this is well
/// above them.
pub const HANG_LIMIT: Duration = Duration::from_secs(20);

/// How much to run.
#[derive(Clone, Copy, Debug)]
pub enum Budget {
    Inputs(u64),
    Time(Duration),
}

/// What one target's run found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub target: String,
    pub inputs: u64,
    pub panics: u64,
    pub hangs: u64,
    pub divergences: u64,
    /// Inputs that ran into a known, reported defect (not counted above).
    pub known: u64,
    pub notes_first_known: Option<(u64, String)>,
    /// The first few findings: `(input index, what)`.
    pub findings: Vec<(u64, String)>,
    /// Extra counters a target keeps (e.g. accepted vs. refused inputs).
    pub notes: Vec<String>,
}

impl Report {
    pub fn clean(&self) -> bool {
        self.panics == 0 && self.hangs == 0 && self.divergences == 0
    }

    fn finding(&mut self, index: u64, what: String) {
        if self.findings.len() < 8 {
            self.findings.push((index, what));
        }
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<11} inputs {:>8}  panics {}  hangs {}  divergences {}",
            self.target, self.inputs, self.panics, self.hangs, self.divergences
        )?;
        if let Some((i, what)) = &self.notes_first_known {
            write!(
                f,
                "\n    {} inputs hit a known defect, first input {i}: {}",
                self.known,
                what.chars().take(300).collect::<String>()
            )?;
        }
        for n in &self.notes {
            write!(f, "\n    {n}")?;
        }
        for (i, what) in &self.findings {
            write!(f, "\n    input {i}: {what}")?;
        }
        Ok(())
    }
}

/// Where the daemon-process targets find the daemon binary.
#[derive(Clone, Debug)]
pub struct Options {
    pub daemon: Option<PathBuf>,
    /// Print every finding as it happens.
    pub verbose: bool,
}

/// A target with its state across inputs (the daemon targets keep one
/// daemon process for the whole run).
pub trait Target {
    /// Run one input.
    fn one(&mut self, g: &mut Gen) -> Verdict;
    /// After the last input: a final check (e.g. the daemon still serves).
    fn finish(&mut self) -> Verdict {
        Ok(())
    }
    /// Counters worth printing.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
    /// The daemon process under test, for the targets that keep one.
    fn daemon(&mut self) -> Option<&mut daemon::Daemon> {
        None
    }
    /// Whether the target can go on after a panic or hang: a dead daemon
    /// is restarted.
    fn recover(&mut self) {
        if let Some(d) = self.daemon() {
            d.recover();
        }
    }
    /// The run found something: keep the evidence the target would
    /// otherwise delete when dropped (the daemon targets keep their
    /// daemon's logs, and say where).
    fn keep_logs(&mut self) {
        if let Some(d) = self.daemon() {
            d.keep_logs();
        }
    }
}

/// Build a target by name.
pub fn target(name: &str, opts: &Options) -> Result<Box<dyn Target>, String> {
    Ok(match name {
        "request" => Box::new(request::RequestTarget::default()),
        "chain" => Box::new(chain::ChainTarget::default()),
        "ioas" => Box::new(ioas::IoasTarget::default()),
        "ram-bound" => Box::new(ram_bound::RamBoundTarget::default()),
        "vhost-user" => Box::new(vhost_user::VhostUserTarget::new(opts)?),
        "mirror" => Box::new(mirror::MirrorTarget::new(opts)?),
        "control" => Box::new(control::ControlTarget::new(opts)?),
        _ => return Err(format!("unknown target {name}; targets: {TARGETS:?}")),
    })
}

/// Run `name` from input `first` on, within `budget`.
pub fn run(name: &str, seed: u64, first: u64, budget: Budget, opts: &Options) -> Report {
    let mut report = Report {
        target: name.to_string(),
        ..Report::default()
    };
    let mut t = match target(name, opts) {
        Ok(t) => t,
        Err(e) => {
            report.divergences += 1;
            report.finding(0, format!("cannot start: {e}"));
            return report;
        }
    };
    let start = Instant::now();
    let mut index = first;
    let watch = Watchdog::start(name, seed);
    loop {
        let more = match budget {
            Budget::Inputs(n) => index - first < n,
            Budget::Time(d) => start.elapsed() < d,
        };
        if !more {
            break;
        }
        let mut g = Gen::new(gen::input_seed(seed, index));
        watch.enter(index);
        let began = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| t.one(&mut g)));
        let took = began.elapsed();
        report.inputs += 1;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(what)) => {
                // Daemon targets report a dead daemon as "panic: ..." and
                // one that stopped serving as "hang: ...".
                if what.starts_with("panic:") {
                    report.panics += 1;
                } else if what.starts_with("known:") {
                    report.known += 1;
                    if report.known == 1 {
                        report.notes_first_known = Some((index, what.clone()));
                    }
                    continue_after_known(&mut *t);
                    index += 1;
                    continue;
                } else if what.starts_with("hang:") {
                    report.hangs += 1;
                } else {
                    report.divergences += 1;
                }
                if opts.verbose {
                    eprintln!("{name} input {index}: {what}");
                }
                report.finding(index, what);
                t.recover();
            }
            Err(p) => {
                report.panics += 1;
                let what = panic_text(&p);
                if opts.verbose {
                    eprintln!("{name} input {index}: panic: {what}");
                }
                report.finding(index, format!("panic: {what}"));
                t.recover();
            }
        }
        if took > HANG_LIMIT {
            report.hangs += 1;
            report.finding(index, format!("took {took:?}"));
        }
        index += 1;
    }
    match catch_unwind(AssertUnwindSafe(|| t.finish())) {
        Ok(Ok(())) => {}
        Ok(Err(what)) => {
            if what.starts_with("panic:") {
                report.panics += 1;
            } else if what.starts_with("hang:") {
                report.hangs += 1;
            } else {
                report.divergences += 1;
            }
            report.finding(index, format!("after the last input: {what}"));
        }
        Err(p) => {
            report.panics += 1;
            report.finding(
                index,
                format!("after the last input: panic: {}", panic_text(&p)),
            );
        }
    }
    report.notes = t.notes();
    if !report.clean() {
        t.keep_logs();
    }
    report
}

fn continue_after_known(t: &mut dyn Target) {
    t.recover();
}

/// Ends the process with the input's coordinates if one input runs for
/// four times [`HANG_LIMIT`]: an in-process hang cannot be interrupted.
struct Watchdog {
    current: std::sync::Arc<std::sync::Mutex<(u64, Instant, bool)>>,
}

impl Watchdog {
    fn start(name: &str, seed: u64) -> Self {
        let current = std::sync::Arc::new(std::sync::Mutex::new((0, Instant::now(), false)));
        let weak = std::sync::Arc::downgrade(&current);
        let name = name.to_string();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            let Some(c) = weak.upgrade() else { return };
            let (index, since, done) = *c.lock().unwrap_or_else(|p| p.into_inner());
            if !done && since.elapsed() > HANG_LIMIT * 4 {
                eprintln!(
                    "HANG: target {name} input {index} (seed {seed}) has run for {:?}; replay with --target {name} --seed {seed} --replay {index}",
                    since.elapsed()
                );
                std::process::exit(3);
            }
        });
        Self { current }
    }

    fn enter(&self, index: u64) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = (index, Instant::now(), false);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).2 = true;
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// `Err(what)` unless `cond`.
pub fn check(cond: bool, what: impl FnOnce() -> String) -> Verdict {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}
