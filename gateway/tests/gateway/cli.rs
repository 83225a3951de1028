//! The command line: `validate`, `print-default-config`, environment overrides. No broker and
//! no ONNX Runtime needed.

use std::process::{Command, Output};

use diredi_gateway::config::RawConfig;

use super::support::*;

fn gateway(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_diredi-gateway"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("DIREDI_") && k.contains("__")) {
        cmd.env_remove(k);
    }
    cmd.args(args).envs(env.iter().copied()).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn validate_lists_every_problem_at_once_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        r#"
[gateway]
id = "has/slash"
[broker]
listen = "0.0.0.0:1884"
[mqtt]
qos = 2
[runtime]
workers = 0
providers = ["cpu", "warp-drive"]
[pipeline]
queue_policy = "drop_oldest"
max_gap_periods = -3.0
[model]
trusted_keys = ["not-a-key"]
"#,
    )
    .unwrap();
    let out = gateway(&["validate", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.starts_with("7 problems in the configuration:"), "{err}");
    for key in [
        "gateway.id:",
        "mqtt.qos:",
        "runtime.workers:",
        "runtime.providers[1]:",
        "pipeline.max_gap_periods:",
        "model.trusted_keys[0]:",
        "mqtt.port:",
    ] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
}

#[test]
fn type_errors_and_unknown_keys_are_reported_per_section() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[mqtt]\nport = \"x\"\n[runtime]\nwrokers = 2\n").unwrap();
    let out = gateway(&["validate", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("mqtt: ") && err.contains("runtime: "), "{err}");
    assert!(err.contains("wrokers"), "{err}");
}

#[test]
fn validate_checks_the_model_against_the_trusted_keys() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_onnx_model(dir.path(), &Spec::small());
    let mut table = config_table(free_port(), true, Some(&manifest));
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, toml::to_string(&table).unwrap()).unwrap();
    let out = gateway(&["validate", "--config", file.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Configuration is valid"));

    let other = diredi_protocol::SigningKey::from_seed(&[1; 32])
        .public()
        .to_base64();
    set(&mut table, "model", "trusted_keys", vec![other]);
    std::fs::write(&file, toml::to_string(&table).unwrap()).unwrap();
    let out = gateway(&["validate", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not trusted"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn environment_overrides_win_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_onnx_model(dir.path(), &Spec::small());
    let mut table = config_table(1000, true, Some(&manifest));
    set(&mut table, "gateway", "id", "from-file");
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, toml::to_string(&table).unwrap()).unwrap();
    let out = gateway(
        &["validate", "--config", file.to_str().unwrap()],
        &[
            ("DIREDI_GATEWAY__ID", "from-env"),
            ("DIREDI_MQTT__HOST", "10.1.2.3"),
            ("DIREDI_MQTT__PORT", "2883"),
            ("DIREDI_BROKER__ENABLED", "false"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(r#"gateway id "from-env", broker external at 10.1.2.3:2883"#),
        "{stdout}"
    );
    let out = gateway(
        &["validate", "--config", file.to_str().unwrap()],
        &[("DIREDI_MQTT__PORT", "not-a-port")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("mqtt"), "{}", text(&out.stderr));
}

#[test]
fn print_default_config_prints_the_compiled_in_defaults() {
    let out = gateway(&["print-default-config"], &[]);
    assert!(out.status.success());
    let raw: RawConfig = toml::from_str(&text(&out.stdout)).unwrap();
    assert_eq!(raw, RawConfig::default());
}

#[test]
fn a_missing_config_file_is_an_error() {
    let out = gateway(&["run", "--config", "/nonexistent/gateway.toml"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no such file"),
        "{}",
        text(&out.stderr)
    );
}

/// `validate --smoke` loads the shipped model into ONNX Runtime and classifies its probe
/// windows (the check `scripts/cross-aarch64.sh` runs under qemu); a library path that does
/// not exist fails it with a message that says how to get the library.
#[test]
fn validate_smoke_runs_the_shipped_model_on_its_probe_windows() {
    let root = repo_root();
    let manifest = root.join("onnx-models/hapt-student-v1.json");
    if !ort_available() && skip("ONNX Runtime") {
        return;
    }
    let key = std::fs::read_to_string(root.join("onnx-models/publisher.pub")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    let config = |library: &str| {
        format!(
            "[gateway]\nid = \"smoke\"\n[model]\npath = {:?}\ntrusted_keys = [{:?}]\n{library}",
            manifest.to_str().unwrap(),
            key.trim()
        )
    };
    std::fs::write(&file, config("")).unwrap();
    let out = gateway(
        &["validate", "--smoke", "--config", file.to_str().unwrap()],
        &[],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}{}", stdout, text(&out.stderr));
    assert!(stdout.contains("smoke run passed"), "{stdout}");
    // "…; R of N probe windows classified as labelled (P%)": the shipped student gets most
    // of its own probe set right.
    let tail = stdout.split("; ").last().unwrap();
    let nums: Vec<f64> = tail
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|w| w.parse().ok())
        .collect();
    let (right, n) = (nums[0], nums[1]);
    assert!(n >= 64.0 && right / n > 0.8, "{stdout}");

    std::fs::write(
        &file,
        config("[runtime]\nlibrary = \"/nonexistent/libonnxruntime.so\"\n"),
    )
    .unwrap();
    let out = gateway(
        &["validate", "--smoke", "--config", file.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("fetch-onnxruntime.sh"),
        "{}",
        text(&out.stderr)
    );
}
