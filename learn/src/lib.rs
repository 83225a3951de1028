//! The learning core of DiReDi: everything that turns recordings into models.
//!
//! Data path: [`dataset`] reads the generic format → [`window`] cuts and standardises
//! windows → [`split`] assigns them to the manufacturer, the pool and the users.
//! Model path: [`model`] defines teacher and student → [`train`] fits them (supervised or
//! knowledge distillation, loss in [`kd`]) → [`metrics`] evaluates → [`onnx`] exports the
//! student for ONNX Runtime.

pub mod dataset;
pub mod kd;
pub mod metrics;
pub mod model;
pub mod onnx;
pub mod split;
pub mod train;
pub mod window;
