// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's configuration, parsed and checked before anything starts.
//!
//! Command-line values arrive as strings; this module turns them into a
//! [`virtio_iommu::DeviceConfig`] and an endpoint list, or into an error that
//! says which flag is wrong and why (QEMU's backend program conventions: a
//! daemon that cannot start says so on stderr and exits non-zero).

use std::os::fd::RawFd;
use std::path::PathBuf;

use iopt::Thp;
use virtio_iommu::DeviceConfig;

/// A bad command-line value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
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
    #[error("--probe-size: {0} is not a multiple of 4 between 24 and 4096")]
    BadProbeSize(u32),
    #[error("--msi-window {start:#x}-{end:#x} is outside --input-range")]
    MsiOutsideInput { start: u64, end: u64 },
    #[error("--vfio: `{0}` is not EP=/dev/vfio/devices/vfioN or EP=fd:N")]
    BadVfio(String),
    #[error("--vfio: endpoint {0} is given twice")]
    DuplicateVfioEndpoint(u32),
    #[error("--vfio: fd {0} is given twice")]
    DuplicateVfioFd(RawFd),
    #[error("--vfio: fd {0} is not an open file descriptor of this process (fds 0-2 are stdio)")]
    VfioFdNotOpen(RawFd),
    #[error(
        "--mode iommufd needs --vfio EP=DEVICE, or --mirror-socket for QEMU to forward its \
         iommufd-backed VFIO devices: its endpoints are VFIO devices"
    )]
    NoVfio,
    #[error(
        "no socket to listen on: give --socket-path PATH or --fd N, or start the daemon \
         through systemd socket activation (LISTEN_FDS)"
    )]
    NoSocket,
    #[error("--vfio is for --mode iommufd (emulated mode has no real devices)")]
    VfioNeedsIommufd,
    #[error(
        "--model-thp is for emulated mode; in --mode iommufd the host kernel's own build decides"
    )]
    ModelThpNeedsEmulated,
    #[error(
        "--endpoints is for emulated mode; in --mode iommufd the endpoints are the --vfio ones"
    )]
    EndpointsWithVfio,
}

/// How guest domains are implemented.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// Each domain is an IOAS of the in-process iommufd model; QEMU mirrors
    /// the translations for the devices it emulates.
    #[default]
    Emulated,
    /// Each domain is a kernel IOAS on `/dev/iommu`; endpoints are VFIO
    /// cdev devices attached to them.
    Iommufd,
}

/// Where a pass-through endpoint's VFIO cdev device comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VfioSource {
    /// A device node, `/dev/vfio/devices/vfioN`.
    Path(PathBuf),
    /// A device file a launcher opened and left to this process (the one
    /// open file through which both may use the device).
    Fd(RawFd),
}

/// `--vfio EP=SOURCE`: endpoint EP is this device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioEndpoint {
    pub endpoint: u32,
    pub source: VfioSource,
}

/// Parse `EP=PATH` or `EP=fd:N`.
pub fn parse_vfio(s: &str) -> Result<VfioEndpoint, CliError> {
    let bad = || CliError::BadVfio(s.to_string());
    let (ep, src) = s.split_once('=').ok_or_else(bad)?;
    let endpoint = to_u32("--vfio", parse_u64("--vfio", ep).map_err(|_| bad())?)?;
    let source = match src.strip_prefix("fd:") {
        Some(n) => VfioSource::Fd(n.trim().parse().map_err(|_| bad())?),
        None if !src.is_empty() => VfioSource::Path(PathBuf::from(src)),
        None => return Err(bad()),
    };
    Ok(VfioEndpoint { endpoint, source })
}

/// Parse a number, decimal or `0x` hex.
pub fn parse_u64(flag: &'static str, s: &str) -> Result<u64, CliError> {
    let s = s.trim();
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
        None => s.replace('_', "").parse(),
    };
    r.map_err(|_| CliError::NotANumber {
        flag,
        value: s.to_string(),
    })
}

/// Parse an inclusive range `A-B`.
pub fn parse_range(flag: &'static str, s: &str) -> Result<(u64, u64), CliError> {
    let (a, b) = s.split_once('-').ok_or_else(|| CliError::NotARange {
        flag,
        value: s.to_string(),
    })?;
    let (start, end) = (parse_u64(flag, a)?, parse_u64(flag, b)?);
    if start > end {
        return Err(CliError::EmptyRange { flag, start, end });
    }
    Ok((start, end))
}

fn to_u32(flag: &'static str, v: u64) -> Result<u32, CliError> {
    u32::try_from(v).map_err(|_| CliError::TooLarge { flag, value: v })
}

/// Parse an endpoint list: comma-separated IDs and inclusive ranges, e.g.
/// `0-0xff,0x100`. Sorted, without duplicates.
pub fn parse_endpoints(s: &str) -> Result<Vec<u32>, CliError> {
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
            return Err(CliError::TooManyEndpoints(count));
        }
        v.extend(start..=end);
    }
    v.sort_unstable();
    v.dedup();
    if v.is_empty() {
        return Err(CliError::NoEndpoints);
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
    pub mode: Mode,
    /// `--vfio` values.
    pub vfio: Vec<String>,
    /// `--model-thp`: whether the modelled kernel has transparent huge
    /// pages (emulated mode); `None` = on.
    pub model_thp: Option<bool>,
}

impl Config {
    /// Pass-through mode whose VFIO devices come from the front-end, which
    /// bound them to its own iommufd and forwards both files over the
    /// mirror (docs/mirror-protocol.md §14).
    pub fn vfio_from_front_end(&self) -> bool {
        self.mode == Mode::Iommufd && self.vfio.is_empty()
    }
}

/// A checked configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub device: DeviceConfig,
    pub endpoints: Vec<u32>,
    pub mode: Mode,
    /// The pass-through devices (iommufd mode), in endpoint order.
    pub vfio: Vec<VfioEndpoint>,
    /// Whether the kernel behind the domains has transparent huge pages
    /// (the IOVA allocator's alignment cap): the model's option in emulated
    /// mode, the host's build in iommufd mode.
    pub thp: Thp,
}

impl RawConfig {
    /// Check every value; defaults are [`DeviceConfig::default`] with boot
    /// bypass on, and every PCI requester ID (`0-0xffff`) as an endpoint.
    pub fn check(&self) -> Result<Config, CliError> {
        let mut device = DeviceConfig::default();
        if let Some(s) = &self.page_size_mask {
            device.page_size_mask = parse_u64("--page-size-mask", s)?;
            if device.page_size_mask == 0 {
                return Err(CliError::NoPageSize(0));
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
            return Err(CliError::MsiOutsideInput { start: ms, end: me });
        }
        if let Some(p) = self.probe_size {
            if !virtio_iommu::DeviceConfig::probe_size_ok(p) {
                return Err(CliError::BadProbeSize(p));
            }
            device.probe_size = p;
        }
        // Firmware and early boot DMA must work before the guest's driver
        // runs: bypass at power-on, as QEMU's virtio-iommu does by default.
        device.bypass = self.bypass.unwrap_or(true);
        let mut vfio = self
            .vfio
            .iter()
            .map(|v| parse_vfio(v))
            .collect::<Result<Vec<_>, _>>()?;
        if self.mode == Mode::Emulated && !vfio.is_empty() {
            return Err(CliError::VfioNeedsIommufd);
        }
        vfio.sort_by_key(|v| v.endpoint);
        for pair in vfio.windows(2) {
            if pair[0].endpoint == pair[1].endpoint {
                return Err(CliError::DuplicateVfioEndpoint(pair[0].endpoint));
            }
        }
        let mut fds: Vec<RawFd> = vfio
            .iter()
            .filter_map(|v| match v.source {
                VfioSource::Fd(fd) => Some(fd),
                VfioSource::Path(_) => None,
            })
            .collect();
        fds.sort_unstable();
        if let Some(pair) = fds.windows(2).find(|p| p[0] == p[1]) {
            return Err(CliError::DuplicateVfioFd(pair[0]));
        }
        if let Some(&fd) = fds
            .iter()
            .find(|&&fd| fd < 3 || !std::path::Path::new(&format!("/proc/self/fd/{fd}")).exists())
        {
            return Err(CliError::VfioFdNotOpen(fd));
        }
        let thp = match (self.mode, self.model_thp) {
            (Mode::Emulated, Some(false)) => Thp::Disabled,
            (Mode::Emulated, _) => Thp::Enabled,
            (Mode::Iommufd, Some(_)) => return Err(CliError::ModelThpNeedsEmulated),
            (Mode::Iommufd, None) => Thp::of_host(),
        };
        let endpoints = match self.mode {
            Mode::Emulated => parse_endpoints(self.endpoints.as_deref().unwrap_or("0-0xffff"))?,
            Mode::Iommufd => {
                if self.endpoints.is_some() {
                    return Err(CliError::EndpointsWithVfio);
                }
                // With no --vfio, the endpoints are the devices QEMU forwards
                // (Config::vfio_from_front_end). Bypass through an identity
                // IOAS is the pass-through device's to set (passthrough.rs).
                vfio.iter().map(|v| v.endpoint).collect()
            }
        };
        Ok(Config {
            device,
            endpoints,
            mode: self.mode,
            vfio,
            thp,
        })
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
            Err(CliError::NotANumber { .. })
        ));
    }

    #[test]
    fn ranges_are_inclusive_and_not_empty() {
        assert_eq!(parse_range("r", "0-0xffff"), Ok((0, 0xffff)));
        assert!(matches!(
            parse_range("r", "5-4"),
            Err(CliError::EmptyRange { .. })
        ));
        assert!(matches!(
            parse_range("r", "5"),
            Err(CliError::NotARange { .. })
        ));
    }

    #[test]
    fn endpoint_lists_mix_ids_and_ranges() {
        assert_eq!(
            parse_endpoints("8, 0x10-0x12,8"),
            Ok(vec![8, 0x10, 0x11, 0x12])
        );
        assert_eq!(parse_endpoints(""), Err(CliError::NoEndpoints));
        assert!(matches!(
            parse_endpoints("0-0x1ffff"),
            Err(CliError::TooManyEndpoints(_))
        ));
        assert!(matches!(
            parse_endpoints("0x1_0000_0000"),
            Err(CliError::TooLarge { .. })
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
        assert_eq!(raw.check(), Err(CliError::BadProbeSize(30)));
        // One rule with the device model's: 24..=4096, multiples of 4.
        for (p, ok) in [(24, true), (4096, true), (20, false), (4100, false)] {
            let raw = RawConfig {
                probe_size: Some(p),
                ..Default::default()
            };
            assert_eq!(raw.check().is_ok(), ok, "--probe-size {p}");
        }
        let raw = RawConfig {
            input_range: Some("0-0xffff".into()),
            ..Default::default()
        };
        assert!(matches!(raw.check(), Err(CliError::MsiOutsideInput { .. })));
        let raw = RawConfig {
            page_size_mask: Some("0".into()),
            ..Default::default()
        };
        assert_eq!(raw.check(), Err(CliError::NoPageSize(0)));
    }

    #[test]
    fn vfio_endpoints_are_paths_or_inherited_fds() {
        assert_eq!(
            parse_vfio("8=/dev/vfio/devices/vfio0"),
            Ok(VfioEndpoint {
                endpoint: 8,
                source: VfioSource::Path("/dev/vfio/devices/vfio0".into())
            })
        );
        assert_eq!(
            parse_vfio("0x10=fd:5").map(|v| v.source),
            Ok(VfioSource::Fd(5))
        );
        for bad in ["8", "8=", "x=/dev/a", "8=fd:", "8=fd:x", "0x1_0000_0000=/a"] {
            assert!(parse_vfio(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn iommufd_mode_takes_its_endpoints_from_vfio() {
        let iommufd = |vfio: &[&str]| RawConfig {
            mode: Mode::Iommufd,
            vfio: vfio.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let c = iommufd(&["16=/dev/b", "8=/dev/a"]).check().unwrap();
        assert_eq!(c.endpoints, [8, 16]);
        let from_qemu = iommufd(&[]).check().unwrap();
        assert!(from_qemu.vfio_from_front_end() && from_qemu.endpoints.is_empty());
        assert!(!c.vfio_from_front_end());
        assert_eq!(
            iommufd(&["8=/dev/a", "8=/dev/b"]).check(),
            Err(CliError::DuplicateVfioEndpoint(8))
        );
        assert_eq!(
            iommufd(&["8=fd:1"]).check(),
            Err(CliError::VfioFdNotOpen(1))
        );
        assert_eq!(
            iommufd(&["8=fd:100000"]).check(),
            Err(CliError::VfioFdNotOpen(100000))
        );
        let mut both = iommufd(&["8=/dev/a"]);
        both.endpoints = Some("8".into());
        assert_eq!(both.check(), Err(CliError::EndpointsWithVfio));
        let emulated = RawConfig {
            vfio: vec!["8=/dev/a".into()],
            ..Default::default()
        };
        assert_eq!(emulated.check(), Err(CliError::VfioNeedsIommufd));
    }

    #[test]
    fn thp_is_a_flag_in_emulated_mode_and_the_hosts_in_iommufd_mode() {
        let emulated = |model_thp| RawConfig {
            model_thp,
            ..Default::default()
        };
        assert_eq!(emulated(None).check().unwrap().thp, Thp::Enabled);
        assert_eq!(emulated(Some(true)).check().unwrap().thp, Thp::Enabled);
        assert_eq!(emulated(Some(false)).check().unwrap().thp, Thp::Disabled);
        let iommufd = |model_thp| RawConfig {
            mode: Mode::Iommufd,
            model_thp,
            ..Default::default()
        };
        assert_eq!(iommufd(None).check().unwrap().thp, Thp::of_host());
        assert_eq!(
            iommufd(Some(false)).check(),
            Err(CliError::ModelThpNeedsEmulated)
        );
    }
}
