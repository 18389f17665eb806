//! Where the model runs: `--device cpu | cuda | cuda:N`, and opening that device.

use candle_core::Device;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// `cpu` or `cuda:N`, as the registry and metrics report it.
    pub fn label(self) -> String {
        match self {
            DeviceSpec::Cpu => "cpu".to_string(),
            DeviceSpec::Cuda(n) => format!("cuda:{n}"),
        }
    }
}

pub(crate) fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    match s {
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" => Ok(DeviceSpec::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceSpec::Cuda)
            .ok_or_else(|| format!("device must be cpu, cuda or cuda:N, got {s}")),
    }
}

/// Opens the device (on CUDA, with the allocation event tracking cudarc does not need here).
pub(crate) fn device(spec: DeviceSpec) -> anyhow::Result<Device> {
    Ok(match spec {
        DeviceSpec::Cpu => Device::Cpu,
        DeviceSpec::Cuda(n) => {
            let device = Device::new_cuda(n)?;
            #[cfg(feature = "cuda")]
            if let Device::Cuda(cuda) = &device
                && std::env::var("SLUICE_CUDA_EVENT_TRACKING").map_or(true, |v| v != "on")
            {
                // cudarc creates two CUDA events for every allocation (and destroys them
                // with it) to order uses across streams, but uses them only once a context
                // has a second stream, which candle's device never creates: two driver calls
                // saved per tensor of every step. `SLUICE_CUDA_EVENT_TRACKING=on` keeps them.
                #[allow(unsafe_code)]
                // SAFETY: every tensor of this device is used on the stream of the thread
                // that runs the model; nothing needs cross-stream ordering.
                unsafe {
                    cuda.disable_event_tracking()
                };
            }
            device
        }
    })
}
