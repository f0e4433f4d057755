// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Emulated mode: the guest's domains live in the in-process iommufd model.
//!
//! Every endpoint is a mock device of [`ModelIommufd`] that behaves like a
//! PCI device behind an x86 IOMMU: its aperture is the device's input range,
//! the MSI doorbell window is reserved (as `iommu_get_resv_regions` reports
//! it on x86), and its page size is the smallest one of the page size mask.

use iopt::model::{MockDevice, ModelIommufd};
use iopt::{DeviceId, IovaRange};
use virtio_iommu::Device;

use crate::config::Config;
use crate::ioas::{DaemonIoas, IommuDevice};

/// The model with one mock device per endpoint (device ID = endpoint ID),
/// of a kernel with or without transparent huge pages as configured.
pub fn model_for(config: &Config) -> ModelIommufd {
    let dev = &config.device;
    let (start, last) = dev.input_range;
    let (msi_start, msi_last) = dev.msi_window;
    let mock = MockDevice {
        aperture: IovaRange { start, last },
        reserved: vec![IovaRange {
            start: msi_start,
            last: msi_last,
        }],
        page_size: 1 << dev.page_size_mask.trailing_zeros(),
    };
    let mut model = ModelIommufd::new().with_thp(config.thp);
    for &ep in &config.endpoints {
        // Endpoint IDs are unique (the config deduplicates them).
        let _ = model.add_device(DeviceId(ep), mock.clone());
    }
    model
}

/// The device in emulated mode, at power-on. Fails if the configuration is
/// one the device model refuses, so that the daemon exits with the reason
/// instead of serving.
pub fn device(config: &Config) -> Result<IommuDevice, virtio_iommu::ConfigError> {
    Device::new(
        config.device,
        DaemonIoas::Model(model_for(config)),
        config.endpoints.iter().map(|&ep| (ep, DeviceId(ep))),
    )
}
