//! The DiReDi cloud worker: the manufacturer's side of the system.
//!
//! - [`pipeline`]: dataset + split → teacher → distilled student → signed ONNX package.
//! - [`onnx_eval`]: evaluating a packaged model through ONNX Runtime, as gateways run it.
//! - [`bench`]: inference speed of a packaged model (figures for the README's claims).
//! - [`bench_gateway`]: end-to-end throughput, READY time and memory of a gateway process.
//! - [`keys`]: signing keys on disk.
//! - [`update`]: the cloud's half of the DiReDi loop (knowledge → teacher update →
//!   re-distillation → deploy gate).
//! - [`cycle_bench`]: `bench`, the whole cycle per user of a split, with its evidence.
//! - [`demo`]: the README's main job, seen from the user's side.
//! - [`simulate`]: replays a dataset's recordings over MQTT as sensors would.

pub mod bench;
pub mod bench_gateway;
pub mod cycle_bench;
pub mod cycle_demo;
pub mod demo;
pub mod keys;
pub mod onnx_eval;
pub mod perf;
pub mod pipeline;
pub mod serve;
pub mod simulate;
pub mod update;
