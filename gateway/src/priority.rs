//! Background work at a lower CPU priority: local adaptation must not slow the inference path.
//!
//! On Linux the nice value is a property of each thread (setpriority(2) on a thread id), and
//! threads inherit it from the thread that creates them. Adaptation runs on its own `adapt`
//! thread and on a rayon pool of its own (candle runs its CPU kernels on the rayon pool it is
//! called from), and every one of those threads is niced; the inference threads, the MQTT
//! client and the async runtime keep the process's priority.
//!
//! Lowering the priority needs no privilege. Where it is refused (a seccomp filter without
//! `setpriority`, another OS), the work still runs, at normal priority, with a warning.

use std::io;

/// Highest nice value (lowest priority) Linux accepts.
pub const MAX_NICE: i32 = 19;

/// Sets the calling thread's nice value to `nice` (0 to [`MAX_NICE`]; higher = lower priority).
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
}
