//! Integration tests of diredi-gateway against real brokers (embedded rumqttd and Mosquitto on
//! free ports), in-process through `run_with` and as a spawned binary.
//!
//! Tests that need ONNX Runtime (the tiny generated ONNX model) or the shipped HAPT model and
//! data skip with a message when those are missing, unless `DIREDI_REQUIRE_DATA` is set.
//! Mosquitto must be installed (`apt-get install -y mosquitto`).

#![allow(clippy::unwrap_used)]

#[path = "gateway/adapt.rs"]
mod adapt;
#[path = "gateway/bad_input.rs"]
mod bad_input;
#[path = "gateway/cli.rs"]
mod cli;
#[path = "gateway/e2e.rs"]
mod e2e;
#[path = "gateway/faults.rs"]
mod faults;
#[path = "gateway/install.rs"]
mod install;
#[path = "gateway/labels.rs"]
mod labels;
#[path = "gateway/onnx.rs"]
mod onnx;
#[path = "gateway/outbox.rs"]
mod outbox;
#[path = "gateway/process.rs"]
mod process;
#[path = "gateway/security.rs"]
mod security;
#[path = "gateway/support.rs"]
mod support;
