//! CPU priorities of the gateway's threads: local adaptation must not slow the inference path,
//! and the inference threads should not wait behind other work for a CPU.
//!
//! On Linux the nice value is a property of each thread (setpriority(2) on a thread id), and
//! threads inherit it from the thread that creates them. Adaptation runs on its own `adapt`
//! thread and on a rayon pool of its own (candle runs its CPU kernels on the rayon pool it is
//! called from), and every one of those threads is niced. The inference threads run at
//! `runtime.inference_nice` (default −10); the MQTT client and the async runtime keep the
//! process's priority.
//!
//! Lowering the priority needs no privilege. Where it is refused (a seccomp filter without
//! `setpriority`, another OS), the work still runs, at normal priority, with a warning.
//! Raising it (a negative nice value) needs `RLIMIT_NICE` (systemd's `LimitNICE=`, set in the
//! shipped unit) or `CAP_SYS_NICE`; without them the inference threads keep the process's
//! priority and the gateway says so once in its log.

use std::io;

/// Highest nice value (lowest priority) Linux accepts.
pub const MAX_NICE: i32 = 19;

/// Lowest nice value (highest priority) Linux accepts.
pub const MIN_NICE: i32 = -20;

/// Sets the calling thread's nice value to `nice` ([`MIN_NICE`] to [`MAX_NICE`]; higher = lower
/// priority). A value below the thread's current one needs the right to raise a priority.
pub fn set_current_thread_nice(nice: i32) -> io::Result<()> {
    rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice).map_err(Into::into)
}

/// The calling thread's nice value.
pub fn current_thread_nice() -> io::Result<i32> {
    rustix::process::getpriority_process(Some(rustix::thread::gettid())).map_err(Into::into)
}

/// [`set_current_thread_nice`], logging (not failing) when the OS refuses.
pub fn lower_current_thread(nice: i32) {
    if let Err(e) = set_current_thread_nice(nice) {
        tracing::warn!(
            error = %e,
            nice,
            "Cannot lower this thread's priority; local adaptation runs at normal priority."
        );
    }
}

/// Sets the calling inference thread's nice value to `nice`. When the OS refuses (no
/// `RLIMIT_NICE` or `CAP_SYS_NICE` for a negative value), the thread keeps its priority and the
/// first refusal is logged: the gateway works the same, with more latency when other work
/// competes for the CPU. Returns the nice value the thread runs at.
pub fn set_inference_thread_nice(nice: i32) -> i32 {
    static REFUSAL_LOGGED: std::sync::Once = std::sync::Once::new();
    match set_current_thread_nice(nice) {
        Ok(()) => nice,
        Err(e) => {
            let kept = current_thread_nice().unwrap_or(0);
            REFUSAL_LOGGED.call_once(|| {
                tracing::info!(
                    error = %e,
                    wanted = nice,
                    kept,
                    "Inference threads run at the process's priority: a negative \
                     runtime.inference_nice needs LimitNICE= (systemd) or CAP_SYS_NICE."
                );
            });
            kept
        }
    }
}

/// A rayon pool of `threads` threads (0 = rayon's default: one per core, or
/// `RAYON_NUM_THREADS`) named `{name}-{i}`, each running at `nice`.
pub fn background_pool(
    name: &str,
    threads: usize,
    nice: i32,
) -> Result<rayon::ThreadPool, rayon::ThreadPoolBuildError> {
    let name = name.to_owned();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{name}-{i}"))
        .start_handler(move |_| lower_current_thread(nice))
        .build()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_lowered_thread_and_the_pool_run_niced_and_leave_the_caller_alone() {
        let caller = current_thread_nice().unwrap();
        let target = (caller + 7).min(MAX_NICE);
        let seen = std::thread::spawn(move || {
            set_current_thread_nice(target).unwrap();
            current_thread_nice().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(seen, target);
        // Per thread: the caller's priority did not change.
        assert_eq!(current_thread_nice().unwrap(), caller);

        let pool = background_pool("test-bg", 2, target).unwrap();
        let mut nices = vec![0; 2];
        pool.scope(|s| {
            for slot in nices.iter_mut() {
                s.spawn(move |_| *slot = current_thread_nice().unwrap());
            }
        });
        assert_eq!(nices, vec![target; 2]);
        // Work installed on the pool (as candle's kernels are) runs on its threads.
        let inside = pool.install(|| {
            use rayon::prelude::*;
            (0..64)
                .into_par_iter()
                .map(|_| current_thread_nice().unwrap())
                .collect::<Vec<_>>()
        });
        assert!(inside.iter().all(|&n| n == target), "{inside:?}");
        assert_eq!(current_thread_nice().unwrap(), caller);
    }

    /// Raising the priority works where the process may (root, `RLIMIT_NICE`), and is refused
    /// without harm elsewhere: either way the thread runs at the value returned.
    #[test]
    fn an_inference_thread_runs_at_the_nice_value_it_reports() {
        let caller = current_thread_nice().unwrap();
        let (got, now, allowed) = std::thread::spawn(move || {
            let allowed = {
                let probe = std::thread::spawn(|| set_current_thread_nice(-3).is_ok());
                probe.join().unwrap()
            };
            let got = set_inference_thread_nice(-3);
            (got, current_thread_nice().unwrap(), allowed)
        })
        .join()
        .unwrap();
        assert_eq!(got, now, "reports the value it runs at");
        if allowed {
            assert_eq!(now, -3);
        } else {
            assert_eq!(now, caller, "a refused raise leaves the priority alone");
        }
        // Per thread: the caller's priority did not change.
        assert_eq!(current_thread_nice().unwrap(), caller);
        // Lowering needs no privilege: it always applies.
        let lower = (caller + 1).min(MAX_NICE);
        let low = std::thread::spawn(move || {
            (
                set_inference_thread_nice(lower),
                current_thread_nice().unwrap(),
            )
        })
        .join()
        .unwrap();
        assert_eq!(low, (lower, lower));
    }
}
