//! How many threads the proxy's runtime gets, and which tokio runtime that means.
//!
//! A sidecar shares its pod's CPU with the application, so it should use no more cores than
//! the pod gave it, as Istio's `concurrency` and Linkerd's proxy cores do. The injector passes
//! the proxy container's CPU limit (or its request when there is no limit) through the
//! downward API in millicores ([`ENV_CPU_MILLIS`]); the proxy rounds that up to whole cores,
//! at least one and at most what the machine offers. `--concurrency` ([`ENV_CONCURRENCY`])
//! overrides it; with nothing set the proxy runs on one core.
//!
//! One worker means tokio's current-thread runtime: every task runs on the thread that
//! accepted its connection, with no cross-thread wake-ups or work stealing. Issue #14 measured
//! one worker instead of two cutting CPU per request by about a fifth. Nothing in the proxy needs a
//! multi-thread runtime: it never calls `block_in_place`, and `spawn_blocking` (DNS lookups)
//! has its own thread pool in either flavour. With tracing on, span export runs on one more
//! thread of its own (`trellis-spans`, see `spans::export`), so it never holds up requests.
//!
//! [`size`] is the pure core (tested below); `run::main` feeds it the flags and the machine's
//! parallelism and builds the runtime with [`build`].

use std::fmt;

/// The proxy container's CPU allowance in millicores, from the downward API
/// (`resourceFieldRef` with divisor `1m`).
pub const ENV_CPU_MILLIS: &str = "TRELLIS_PROXY_CPU_MILLIS";
/// Explicit worker count; `0` means every core of the machine.
pub const ENV_CONCURRENCY: &str = "TRELLIS_CONCURRENCY";
/// The largest `--concurrency` accepted: far above any core count a sidecar gets, low enough
/// that a typo cannot ask for millions of threads.
pub const MAX_CONCURRENCY: usize = 1024;

/// Where the worker count came from (logged at startup).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `--concurrency N` / `TRELLIS_CONCURRENCY`.
    Concurrency,
    /// `--concurrency 0`: every core.
    AllCores,
    /// The container's CPU allowance, in millicores.
    CpuAllowance { millis: u64 },
    /// Nothing set (or an allowance that could not be read): one core.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Concurrency => f.write_str("--concurrency"),
            Source::AllCores => f.write_str("--concurrency 0 (all cores)"),
            Source::CpuAllowance { millis } => write!(f, "CPU allowance {millis}m"),
            Source::Default => f.write_str("default"),
        }
    }
}

/// Which tokio runtime runs the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    CurrentThread,
    MultiThread,
}

impl Flavor {
    /// The label value `trellis_proxy_runtime_workers` carries.
    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::CurrentThread => "current_thread",
            Flavor::MultiThread => "multi_thread",
        }
    }
}

/// The chosen runtime size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizing {
    pub workers: usize,
    pub source: Source,
}

impl Sizing {
    pub fn flavor(&self) -> Flavor {
        if self.workers == 1 {
            Flavor::CurrentThread
        } else {
            Flavor::MultiThread
        }
    }
}

/// The worker count for `concurrency` (the override), else the CPU allowance `cpu_millis`
/// (the raw environment value), else one; `available` is the machine's parallelism.
///
/// An allowance that is not a whole number of millicores does not stop the proxy: it only
/// sizes the runtime, the downward API always writes an integer, and a pod crash-looping over
/// a hand-set tuning value would be worse than running on one core. It yields a warning to log
/// instead. A bad `--concurrency` is refused earlier, by the flag parser.
pub fn size(
    concurrency: Option<usize>,
    cpu_millis: Option<&str>,
    available: usize,
) -> (Sizing, Option<String>) {
    let available = available.max(1);
    match concurrency {
        Some(0) => {
            return (
                Sizing {
                    workers: available,
                    source: Source::AllCores,
                },
                None,
            );
        }
        Some(n) => {
            return (
                Sizing {
                    workers: n,
                    source: Source::Concurrency,
                },
                None,
            );
        }
        None => {}
    }
    let default = Sizing {
        workers: 1,
        source: Source::Default,
    };
    let Some(raw) = cpu_millis.map(str::trim).filter(|s| !s.is_empty()) else {
        return (default, None);
    };
    match raw.parse::<u64>() {
        Ok(millis) => {
            let cores = usize::try_from(millis.div_ceil(1000)).unwrap_or(usize::MAX);
            (
                Sizing {
                    workers: cores.clamp(1, available),
                    source: Source::CpuAllowance { millis },
                },
                None,
            )
        }
        Err(_) => (
            default,
            Some(format!(
                "{ENV_CPU_MILLIS}={raw:?} is not a whole number of millicores; running on one core"
            )),
        ),
    }
}

/// Builds the runtime for `sizing`.
pub fn build(sizing: Sizing) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match sizing.flavor() {
        Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        Flavor::MultiThread => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(sizing.workers);
            b
        }
    };
    builder.thread_name("trellis-proxy").enable_all().build()
}

/// What the running runtime is, read from tokio itself, so `/metrics` reports the runtime
/// that serves the traffic (in-process test proxies included), not what a flag asked for.
pub fn current() -> (Flavor, usize) {
    let handle = tokio::runtime::Handle::current();
    let flavor = match handle.runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => Flavor::CurrentThread,
        _ => Flavor::MultiThread,
    };
    (flavor, handle.metrics().num_workers())
}

/// `--concurrency`: a worker count from 0 (all cores) to [`MAX_CONCURRENCY`].
pub fn parse_concurrency(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n <= MAX_CONCURRENCY => Ok(n),
        Ok(n) => Err(format!(
            "{n} worker threads is more than {MAX_CONCURRENCY}; use 0 for every core"
        )),
        Err(_) => Err(format!(
            "{s:?} is not a number of worker threads (0 = every core)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(concurrency: Option<usize>, millis: Option<&str>, available: usize) -> usize {
        size(concurrency, millis, available).0.workers
    }

    #[test]
    fn nothing_set_is_one_core_on_the_current_thread_runtime() {
        let (s, warning) = size(None, None, 8);
        assert_eq!(
            s,
            Sizing {
                workers: 1,
                source: Source::Default
            }
        );
        assert_eq!(s.flavor(), Flavor::CurrentThread);
        assert_eq!(warning, None);
        // An empty variable is "not set".
        assert_eq!(size(None, Some(""), 8), (s, None));
    }

    #[test]
    fn allowance_rounds_up_to_whole_cores() {
        assert_eq!(workers(None, Some("100"), 8), 1);
        assert_eq!(workers(None, Some("1000"), 8), 1);
        assert_eq!(workers(None, Some("1001"), 8), 2);
        assert_eq!(workers(None, Some("2500"), 8), 3);
        assert_eq!(workers(None, Some(" 2000\n"), 8), 2);
        let (s, _) = size(None, Some("1500"), 8);
        assert_eq!(s.source, Source::CpuAllowance { millis: 1500 });
        assert_eq!(s.flavor(), Flavor::MultiThread);
    }

    #[test]
    fn allowance_is_at_least_one_and_at_most_the_machine() {
        // A request of 0 (none set) still runs.
        assert_eq!(workers(None, Some("0"), 8), 1);
        // The downward API gives node allocatable when no limit is set; never more threads
        // than cores.
        assert_eq!(workers(None, Some("64000"), 4), 4);
        assert_eq!(workers(None, Some(&u64::MAX.to_string()), 4), 4);
        // A machine that reports no parallelism counts as one core.
        assert_eq!(workers(None, Some("4000"), 0), 1);
    }

    #[test]
    fn concurrency_overrides_the_allowance() {
        assert_eq!(workers(Some(3), Some("1000"), 8), 3);
        assert_eq!(size(Some(3), None, 8).0.source, Source::Concurrency);
        // Explicit counts above the core count are honoured: the operator asked for them.
        assert_eq!(workers(Some(16), None, 2), 16);
        assert_eq!(workers(Some(1), Some("4000"), 8), 1);
        let (s, _) = size(Some(0), Some("1000"), 6);
        assert_eq!(
            s,
            Sizing {
                workers: 6,
                source: Source::AllCores
            }
        );
    }

    #[test]
    fn a_garbage_allowance_runs_on_one_core_with_a_warning() {
        for bad in ["1.5", "500m", "-1", "lots", "18446744073709551616"] {
            let (s, warning) = size(None, Some(bad), 8);
            assert_eq!(s.workers, 1, "{bad}");
            assert_eq!(s.source, Source::Default, "{bad}");
            let w = warning.unwrap_or_else(|| panic!("no warning for {bad}"));
            assert!(w.contains(ENV_CPU_MILLIS) && w.contains(bad), "{w}");
        }
    }

    #[test]
    fn concurrency_flag_values() {
        assert_eq!(parse_concurrency("0"), Ok(0));
        assert_eq!(parse_concurrency("4"), Ok(4));
        assert_eq!(parse_concurrency("1024"), Ok(1024));
        for bad in ["-1", "two", "1.5", "", "1025", "99999999999999999999999"] {
            assert!(parse_concurrency(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn build_gives_the_flavor_and_worker_count_asked_for() {
        for (n, flavor) in [(1, Flavor::CurrentThread), (3, Flavor::MultiThread)] {
            let rt = build(Sizing {
                workers: n,
                source: Source::Concurrency,
            })
            .unwrap();
            assert_eq!(rt.block_on(async { current() }), (flavor, n));
        }
    }
}
