//! The learning core of DiReDi: everything that turns recordings into models.
//!
//! Data path: [`dataset`] reads the generic format → [`window`] cuts and standardises
//! windows → [`split`] assigns them to the manufacturer, the pool and the users.
//! Model path: [`model`] defines teacher and student → [`train`] fits them (supervised or
//! knowledge distillation, loss in [`kd`]) → [`metrics`] evaluates → [`onnx`] exports the
//! student for ONNX Runtime, and [`onnx::import`] brings an installed student back.
//! DiReDi loop (gateway side): [`probe`] (the manufacturer's small probe set) → [`adapt`]
//! (guarded local fine-tuning) → [`knowledge`] (reverse distillation: the quantised delta the
//! cloud applies to the same installed student).

pub mod adapt;
pub mod dataset;
pub mod kd;
pub mod knowledge;
pub mod metrics;
pub mod model;
pub mod onnx;
pub mod privacy;
pub mod probe;
pub mod split;
pub mod train;
pub mod window;
