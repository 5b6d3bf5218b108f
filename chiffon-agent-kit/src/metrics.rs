//! Host metrics for heartbeats and the desktop agent's `metrics_snapshot`: CPU use and load,
//! memory (sysinfo), and per-GPU utilisation and memory through NVML when an NVIDIA driver
//! is present (no driver: no GPUs, no error).

use chiffon_protocol::{CpuMetrics, GpuMetrics, MemoryMetrics};
use nvml_wrapper::Nvml;
use sysinfo::System;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// One sample of the host's resources.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostMetrics {
    pub cpu: CpuMetrics,
    pub memory: MemoryMetrics,
    pub gpus: Vec<GpuMetrics>,
}

impl HostMetrics {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "cpu": self.cpu, "memory": self.memory, "gpus": self.gpus })
    }
}

/// Keeps the sysinfo state between samples: CPU use is a difference between two refreshes,
/// so the first sample after [`MetricsCollector::new`] is taken after a short wait.
pub struct MetricsCollector {
    system: Option<System>,
    nvml: Option<Nvml>,
    primed: bool,
}

impl std::fmt::Debug for MetricsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsCollector")
            .field("nvml", &self.nvml.is_some())
            .finish()
    }
}

impl MetricsCollector {
    /// `gpus = false` skips NVML entirely.
    pub fn new(gpus: bool) -> Self {
        let system = match System::new() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "sysinfo unavailable: cpu and memory figures will be 0");
                None
            }
        };
        let nvml = if gpus {
            match Nvml::init() {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::debug!(error = %e, "no NVIDIA driver: reporting no GPUs");
                    None
                }
            }
        } else {
            None
        };
        MetricsCollector {
            system,
            nvml,
            primed: false,
        }
    }

    /// Whether NVML is loaded.
    pub fn has_nvml(&self) -> bool {
        self.nvml.is_some()
    }

    /// Takes a sample. Blocks for sysinfo's minimum CPU interval (about 200 ms) on the first
    /// call only; call it from `spawn_blocking` in async code.
    pub fn sample(&mut self) -> HostMetrics {
        let mut out = HostMetrics::default();
        if let Some(sys) = self.system.as_mut() {
            if !self.primed {
                sys.refresh_cpu_usage();
                std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
                self.primed = true;
            }
            sys.refresh_cpu_usage();
            sys.refresh_memory();
            out.cpu = CpuMetrics {
                percent: f64::from(sys.global_cpu_usage()),
                cores: u32::try_from(sys.cpus().len()).unwrap_or(u32::MAX),
                load_1m: System::load_average().map(|l| l.one).unwrap_or(0.0),
            };
            out.memory = MemoryMetrics {
                used_gb: sys.used_memory() as f64 / GIB,
                total_gb: sys.total_memory() as f64 / GIB,
            };
        }
        if let Some(nvml) = &self.nvml {
            out.gpus = gpu_metrics(nvml);
        }
        out
    }
}

fn gpu_metrics(nvml: &Nvml) -> Vec<GpuMetrics> {
    let count = match nvml.device_count() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "nvml: cannot count devices");
            return Vec::new();
        }
    };
    (0..count)
        .filter_map(|i| {
            let dev = nvml.device_by_index(i).ok()?;
            let mem = dev.memory_info().ok();
            Some(GpuMetrics {
                index: i,
                name: dev.name().unwrap_or_default(),
                utilization_percent: dev
                    .utilization_rates()
                    .map(|u| f64::from(u.gpu))
                    .unwrap_or(0.0),
                memory_used_gb: mem.as_ref().map(|m| m.used as f64 / GIB).unwrap_or(0.0),
                memory_total_gb: mem.as_ref().map(|m| m.total as f64 / GIB).unwrap_or(0.0),
            })
        })
        .collect()
}

/// The host name (sysinfo), or `localhost` when unknown.
pub fn hostname() -> String {
    System::host_name()
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_has_real_memory_and_cores() {
        let mut c = MetricsCollector::new(true);
        let m = c.sample();
        assert!(m.memory.total_gb > 0.0, "{m:?}");
        assert!(m.memory.used_gb > 0.0 && m.memory.used_gb <= m.memory.total_gb);
        assert!(m.cpu.cores >= 1);
        assert!((0.0..=100.0).contains(&m.cpu.percent));
        if !c.has_nvml() {
            assert!(m.gpus.is_empty());
        }
        // On a machine known to have an NVIDIA GPU (set by whoever runs the test there).
        if std::env::var("CHIFFON_EXPECT_GPU").is_ok_and(|v| v == "1") {
            assert!(c.has_nvml(), "NVML did not load");
            assert!(!m.gpus.is_empty(), "no GPU reported");
            for g in &m.gpus {
                assert!(g.memory_total_gb > 1.0 && !g.name.is_empty(), "{g:?}");
                assert!((0.0..=100.0).contains(&g.utilization_percent), "{g:?}");
            }
            println!("gpus: {:?}", m.gpus);
        }
    }
}
