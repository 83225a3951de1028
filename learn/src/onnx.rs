//! ONNX export of a trained network, for ONNX Runtime on the gateways.
//!
//! Where it stands: the last step of the cloud model flow (teacher → distil student → **export**
//! → sign manifest → gateway). The graph follows the tensor conventions of
//! `docs/ARCHITECTURE.md`: input `input` `[batch, C, T]` (batch symbolic), output
//! `probabilities` `[batch, K]` with the softmax inside the graph.
//!
//! Only operators every ONNX runtime has are used: `Conv` (asymmetric `pads`), `Relu`,
//! `GlobalAveragePool`, `Flatten`, `Gemm` and `Softmax`. Batch norm is folded into the conv
//! weights ([`Net::folded`]) and dropout disappears. The bytes are a pure function of the
//! network's weights and configuration (no time stamps), so the same weights always hash the
//! same.
//!
//! [`import`] is the way back: it rebuilds a trainable candle [`Net`] (without batch norm, the
//! norm being folded) from a file this module exported. The gateway and the cloud both adapt
//! the *installed* student, so both start from `import(installed .onnx)` and knowledge deltas
//! are relative to exactly those weights. `export(import(bytes)) == bytes` for our files.

use prost::Message;
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::model::{Arch, ConvSpec, FoldedDense, ModelConfig, ModelError, Net};

/// Opset of the exported graph (ONNX Runtime 1.31 supports up to 23).
pub const OPSET: i64 = 17;
/// ONNX IR version of the exported file.
pub const IR_VERSION: i64 = 8;
/// Name of the graph input.
pub const INPUT_NAME: &str = "input";
/// Name of the graph output.
pub const OUTPUT_NAME: &str = "probabilities";

/// Errors of the export.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// Reading the network's weights failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A dimension does not fit the ONNX integer type.
    #[error("dimension {0} is too large for ONNX")]
    Dimension(usize),
    /// The bytes are not an ONNX protobuf.
    #[error("not an ONNX model: {0}")]
    Decode(String),
    /// The graph is valid ONNX but not one this module exports.
    #[error("unsupported ONNX graph: {0}")]
    Unsupported(String),
    /// Building the network failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

fn dim(v: usize) -> Result<i64, OnnxError> {
    i64::try_from(v).map_err(|_| OnnxError::Dimension(v))
}

fn initializer(name: &str, dims: &[usize], values: &[f32]) -> Result<TensorProto, OnnxError> {
    let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(TensorProto {
        name: name.to_owned(),
        dims: dims.iter().map(|&d| dim(d)).collect::<Result<_, _>>()?,
        data_type: DataType::Float as i32,
        raw_data,
        ..TensorProto::default()
    })
}

fn ints(name: &str, values: Vec<i64>) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        r#type: AttributeType::Ints as i32,
        ints: values,
        ..AttributeProto::default()
    }
}

fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..AttributeProto::default()
    }
}

fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    output: &str,
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: op.to_owned(),
        name: name.to_owned(),
        input: inputs.iter().map(|s| (*s).to_owned()).collect(),
        output: vec![output.to_owned()],
        attribute: attrs,
        ..NodeProto::default()
    }
}

fn float_value(name: &str, dims: &[Option<usize>]) -> Result<ValueInfoProto, OnnxError> {
    let dim = dims
        .iter()
        .map(|d| {
            Ok(tensor_shape_proto::Dimension {
                value: Some(match d {
                    Some(v) => tensor_shape_proto::dimension::Value::DimValue(dim(*v)?),
                    None => tensor_shape_proto::dimension::Value::DimParam("batch".to_owned()),
                }),
                ..Default::default()
            })
        })
        .collect::<Result<Vec<_>, OnnxError>>()?;
    Ok(ValueInfoProto {
        name: name.to_owned(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..TypeProto::default()
        }),
        ..ValueInfoProto::default()
    })
}

fn gemm(
    name: &str,
    input: &str,
    d: &FoldedDense,
    nodes: &mut Vec<NodeProto>,
    inits: &mut Vec<TensorProto>,
) -> Result<String, OnnxError> {
    let (w, b) = (format!("{name}.weight"), format!("{name}.bias"));
    inits.push(initializer(&w, &[d.out, d.inp], &d.weight)?);
    inits.push(initializer(&b, &[d.out], &d.bias)?);
    nodes.push(node(
        "Gemm",
        name,
        &[input, &w, &b],
        name,
        vec![int("transB", 1)],
    ));
    Ok(name.to_owned())
}

/// The network as an ONNX model.
pub fn to_model_proto(net: &Net) -> Result<ModelProto, OnnxError> {
    let cfg = net.config();
    let folded = net.folded()?;
    let mut nodes = Vec::new();
    let mut inits = Vec::new();
    let mut cur = INPUT_NAME.to_owned();
    for (i, c) in folded.convs.iter().enumerate() {
        let (w, b, out) = (
            format!("conv{i}.weight"),
            format!("conv{i}.bias"),
            format!("conv{i}"),
        );
        inits.push(initializer(
            &w,
            &[c.spec.out, c.in_channels, c.spec.kernel],
            &c.weight,
        )?);
        inits.push(initializer(&b, &[c.spec.out], &c.bias)?);
        nodes.push(node(
            "Conv",
            &out,
            &[&cur, &w, &b],
            &out,
            vec![
                ints("kernel_shape", vec![dim(c.spec.kernel)?]),
                ints("strides", vec![dim(c.spec.stride)?]),
                ints("pads", vec![dim(c.pad.0)?, dim(c.pad.1)?]),
                ints("dilations", vec![1]),
                int("group", 1),
            ],
        ));
        let relu = format!("relu{i}");
        nodes.push(node("Relu", &relu, &[&out], &relu, Vec::new()));
        cur = relu;
    }
    nodes.push(node(
        "GlobalAveragePool",
        "pool",
        &[&cur],
        "pool",
        Vec::new(),
    ));
    nodes.push(node(
        "Flatten",
        "features",
        &["pool"],
        "features",
        vec![int("axis", 1)],
    ));
    cur = "features".to_owned();
    for (j, d) in folded.hidden.iter().enumerate() {
        let fc = gemm(&format!("fc{j}"), &cur, d, &mut nodes, &mut inits)?;
        let relu = format!("fc{j}_relu");
        nodes.push(node("Relu", &relu, &[&fc], &relu, Vec::new()));
        cur = relu;
    }
    let logits = gemm("head", &cur, &folded.head, &mut nodes, &mut inits)?;
    nodes.push(node(
        "Softmax",
        OUTPUT_NAME,
        &[&logits],
        OUTPUT_NAME,
        vec![int("axis", -1)],
    ));

    let graph = GraphProto {
        name: format!("diredi-{:?}", cfg.arch).to_lowercase(),
        node: nodes,
        initializer: inits,
        input: vec![float_value(
            INPUT_NAME,
            &[None, Some(cfg.in_channels), Some(cfg.window)],
        )?],
        output: vec![float_value(OUTPUT_NAME, &[None, Some(cfg.num_classes)])?],
        ..GraphProto::default()
    };
    Ok(ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "diredi-learn".to_owned(),
        producer_version: env!("CARGO_PKG_VERSION").to_owned(),
        graph: Some(graph),
        ..ModelProto::default()
    })
}

/// The network as ONNX bytes.
pub fn export(net: &Net) -> Result<Vec<u8>, OnnxError> {
    Ok(to_model_proto(net)?.encode_to_vec())
}

/// Most bytes [`import`] accepts (a generous bound for edge models).
pub const MAX_IMPORT_BYTES: usize = 64 << 20;

fn unsupported(what: impl Into<String>) -> OnnxError {
    OnnxError::Unsupported(what.into())
}

fn attr_ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.ints.clone())
}

fn attr_int(n: &NodeProto, name: &str) -> Option<i64> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

fn to_usize(v: i64, what: &str) -> Result<usize, OnnxError> {
    usize::try_from(v).map_err(|_| unsupported(format!("{what} is {v}")))
}

/// Dims and f32 values of an initializer (raw little-endian or `float_data`).
fn tensor_values(t: &TensorProto) -> Result<(Vec<usize>, Vec<f32>), OnnxError> {
    if t.data_type != DataType::Float as i32 {
        return Err(unsupported(format!(
            "initializer `{}` has data type {}, only float is supported",
            t.name, t.data_type
        )));
    }
    let dims = t
        .dims
        .iter()
        .map(|&d| to_usize(d, &format!("a dimension of `{}`", t.name)))
        .collect::<Result<Vec<_>, _>>()?;
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| unsupported(format!("`{}` is too large", t.name)))?;
    let values: Vec<f32> = if !t.raw_data.is_empty() {
        t.raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        t.float_data.clone()
    };
    if values.len() != count || (!t.raw_data.is_empty() && t.raw_data.len() != 4 * count) {
        return Err(unsupported(format!(
            "initializer `{}` holds {} values, its dims {:?} need {count}",
            t.name,
            values.len(),
            dims
        )));
    }
    Ok((dims, values))
}

fn input_shape(g: &GraphProto) -> Result<(usize, usize), OnnxError> {
    let [input] = g.input.as_slice() else {
        return Err(unsupported(format!(
            "the graph has {} inputs, expected one",
            g.input.len()
        )));
    };
    let dims = match input.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => t.shape.as_ref().map(|s| s.dim.clone()),
        _ => None,
    }
    .ok_or_else(|| unsupported("the input has no tensor shape"))?;
    use tensor_shape_proto::dimension::Value::DimValue;
    match dims.as_slice() {
        [_, c, t] => match (&c.value, &t.value) {
            (Some(DimValue(c)), Some(DimValue(t))) => {
                Ok((to_usize(*c, "input channels")?, to_usize(*t, "window")?))
            }
            _ => Err(unsupported("input channels and window must be fixed")),
        },
        _ => Err(unsupported(format!(
            "the input has {} dimensions, expected [batch, C, T]",
            dims.len()
        ))),
    }
}

/// Rebuilds a trainable [`Net`] from ONNX bytes produced by [`export`]: `Conv`+`Relu` blocks,
/// `GlobalAveragePool`, `Flatten`, `Gemm`(+`Relu`) layers, a `Gemm` head and `Softmax`. The
/// result has no batch norm (it was folded) and no dropout; its outputs are the logits whose
/// softmax the file computes. Anything else is refused with [`OnnxError::Unsupported`].
pub fn import(bytes: &[u8]) -> Result<Net, OnnxError> {
    if bytes.len() > MAX_IMPORT_BYTES {
        return Err(OnnxError::Decode(format!(
            "{} bytes, more than the {MAX_IMPORT_BYTES} accepted",
            bytes.len()
        )));
    }
    let model = ModelProto::decode(bytes).map_err(|e| OnnxError::Decode(e.to_string()))?;
    let g = model
        .graph
        .ok_or_else(|| OnnxError::Decode("the model has no graph".to_owned()))?;
    let (in_channels, window) = input_shape(&g)?;
    let mut inits: HashMap<&str, &TensorProto> = HashMap::new();
    for t in &g.initializer {
        inits.insert(t.name.as_str(), t);
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let take = |name: &str, want: &[usize]| -> Result<Vec<f32>, OnnxError> {
        let t = inits
            .get(name)
            .ok_or_else(|| unsupported(format!("initializer `{name}` missing")))?;
        let (dims, values) = tensor_values(t)?;
        if dims != want {
            return Err(unsupported(format!(
                "initializer `{name}` is {dims:?}, expected {want:?}"
            )));
        }
        Ok(values)
    };

    let mut convs = Vec::new();
    let mut hidden = Vec::new();
    let mut head: Option<(usize, usize)> = None;
    let mut cin = in_channels;
    let mut len = window;
    let mut features: Option<usize> = None;
    let mut pending_dense: Option<(String, usize)> = None;
    let mut saw_softmax = false;
    for n in &g.node {
        if saw_softmax {
            return Err(unsupported(format!("node `{}` after the softmax", n.name)));
        }
        match n.op_type.as_str() {
            "Conv" => {
                if features.is_some() {
                    return Err(unsupported("a Conv after the pooling"));
                }
                let w = n
                    .input
                    .get(1)
                    .ok_or_else(|| unsupported("Conv without weight"))?;
                let wt = inits
                    .get(w.as_str())
                    .ok_or_else(|| unsupported(format!("initializer `{w}` missing")))?;
                let dims = &wt.dims;
                if dims.len() != 3 {
                    return Err(unsupported(format!(
                        "Conv weight `{w}` is not [out, in, k]"
                    )));
                }
                let (out, k) = (to_usize(dims[0], "conv out")?, to_usize(dims[2], "kernel")?);
                let stride = match attr_ints(n, "strides").as_deref() {
                    Some([s]) => to_usize(*s, "stride")?,
                    None => 1,
                    _ => return Err(unsupported("Conv strides must be one integer")),
                };
                if attr_int(n, "group").is_some_and(|g| g != 1)
                    || attr_ints(n, "dilations").is_some_and(|d| d.iter().any(|&v| v != 1))
                {
                    return Err(unsupported("grouped or dilated Conv"));
                }
                let spec = ConvSpec::new(out, k, stride);
                if spec.out == 0 || spec.kernel < spec.stride || spec.stride == 0 {
                    return Err(unsupported(format!("Conv {spec:?}")));
                }
                let (out_len, left, right) = spec.geometry(len);
                let pads = attr_ints(n, "pads").unwrap_or_default();
                if pads != [dim(left)?, dim(right)?] {
                    return Err(unsupported(format!(
                        "Conv pads {pads:?}, expected [{left}, {right}] (same padding)"
                    )));
                }
                let i = convs.len();
                let b = n
                    .input
                    .get(2)
                    .ok_or_else(|| unsupported("Conv without bias"))?;
                let wv = take(w, &[out, cin, k])?;
                let bv = take(b, &[out])?;
                tensors.insert(
                    format!("conv{i}.weight"),
                    Tensor::from_vec(wv, (out, cin, k), &Device::Cpu)?,
                );
                tensors.insert(
                    format!("conv{i}.bias"),
                    Tensor::from_vec(bv, out, &Device::Cpu)?,
                );
                convs.push(spec);
                cin = out;
                len = out_len;
            }
            "Relu" => {
                if let Some((name, out)) = pending_dense.take() {
                    // The Gemm just seen was a hidden layer.
                    let j = hidden.len();
                    let w = tensors.remove(&format!("{name}.weight"));
                    let b = tensors.remove(&format!("{name}.bias"));
                    if let (Some(w), Some(b)) = (w, b) {
                        tensors.insert(format!("fc{j}.weight"), w);
                        tensors.insert(format!("fc{j}.bias"), b);
                    }
                    hidden.push(out);
                    features = Some(out);
                }
            }
            "GlobalAveragePool" => features = Some(cin),
            "Flatten" => {}
            "Gemm" => {
                if pending_dense.is_some() {
                    return Err(unsupported("two Gemm without a Relu between them"));
                }
                let inp = features.ok_or_else(|| unsupported("a Gemm before the pooling"))?;
                if attr_int(n, "transB") != Some(1) {
                    return Err(unsupported("Gemm without transB = 1"));
                }
                let w = n
                    .input
                    .get(1)
                    .ok_or_else(|| unsupported("Gemm without weight"))?;
                let b = n
                    .input
                    .get(2)
                    .ok_or_else(|| unsupported("Gemm without bias"))?;
                let wt = inits
                    .get(w.as_str())
                    .ok_or_else(|| unsupported(format!("initializer `{w}` missing")))?;
                let out = match wt.dims.first() {
                    Some(&o) => to_usize(o, "Gemm out")?,
                    None => return Err(unsupported("Gemm weight without dims")),
                };
                let wv = take(w, &[out, inp])?;
                let bv = take(b, &[out])?;
                let tmp = format!("gemm{}", hidden.len());
                tensors.insert(
                    format!("{tmp}.weight"),
                    Tensor::from_vec(wv, (out, inp), &Device::Cpu)?,
                );
                tensors.insert(
                    format!("{tmp}.bias"),
                    Tensor::from_vec(bv, out, &Device::Cpu)?,
                );
                pending_dense = Some((tmp, out));
            }
            "Softmax" => {
                let (name, out) = pending_dense
                    .take()
                    .ok_or_else(|| unsupported("Softmax not after a Gemm head"))?;
                let w = tensors.remove(&format!("{name}.weight"));
                let b = tensors.remove(&format!("{name}.bias"));
                if let (Some(w), Some(b)) = (w, b) {
                    tensors.insert("head.weight".to_owned(), w);
                    tensors.insert("head.bias".to_owned(), b);
                }
                head = Some((out, features.unwrap_or(cin)));
                saw_softmax = true;
            }
            other => return Err(unsupported(format!("operator {other}"))),
        }
    }
    let (num_classes, _) = head.ok_or_else(|| unsupported("no Gemm head followed by Softmax"))?;
    let arch = if g.name.contains("teacher") {
        Arch::Teacher
    } else {
        Arch::Student
    };
    let config = ModelConfig {
        arch,
        in_channels,
        window,
        num_classes,
        convs,
        hidden,
        batch_norm: false,
        dropout: 0.0,
    };
    Ok(Net::from_named(config, tensors, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};
    use tract_onnx::prelude::*;

    fn random_input(n: usize, c: usize, t: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n * c * t).map(|_| rng.gen_range(-2.0..2.0)).collect()
    }

    /// Makes the batch-norm statistics non-trivial, so folding is really exercised.
    fn warm_batch_norm(net: &Net, x: &[f32], n: usize) {
        let cfg = net.config();
        let t = Tensor::from_slice(x, (n, cfg.in_channels, cfg.window), &Device::Cpu).unwrap();
        for _ in 0..5 {
            net.forward_t(&t, true).unwrap();
        }
    }

    fn run_tract(bytes: &[u8], x: &[f32], n: usize, c: usize, t: usize) -> Vec<f32> {
        let model = tract_onnx::onnx()
            .model_for_read(&mut &*bytes)
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let input = tract_onnx::prelude::Tensor::from_shape(&[n, c, t], x).unwrap();
        let out = model.run(tvec!(input.into_tvalue())).unwrap();
        out[0]
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect()
    }

    #[test]
    fn exported_student_matches_candle_in_tract() {
        let (c, t, k, n) = (3, 40, 4, 5);
        let mut cfg = ModelConfig::student(c, t, k);
        cfg.hidden = vec![8];
        let net = Net::new(cfg, 3).unwrap();
        let x = random_input(n, c, t, 9);
        warm_batch_norm(&net, &x, n);
        let bytes = export(&net).unwrap();

        let input = Tensor::from_slice(&x, (n, c, t), &Device::Cpu).unwrap();
        let logits = net.forward_t(&input, false).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&logits)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = run_tract(&bytes, &x, n, c, t);
        assert_eq!(got.len(), n * k);
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(max <= 1e-5, "max |Δ| = {max}");
    }

    #[test]
    fn export_is_a_pure_function_of_the_weights() {
        let cfg = ModelConfig::student(2, 16, 3);
        let a = export(&Net::new(cfg.clone(), 1).unwrap()).unwrap();
        let b = export(&Net::new(cfg.clone(), 1).unwrap()).unwrap();
        let c = export(&Net::new(cfg, 2).unwrap()).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn graph_declares_the_architecture_interface() {
        let net = Net::new(ModelConfig::student(6, 128, 5), 0).unwrap();
        let m = ModelProto::decode(export(&net).unwrap().as_slice()).unwrap();
        assert_eq!(
            (m.ir_version, m.opset_import[0].version),
            (IR_VERSION, OPSET)
        );
        let g = m.graph.unwrap();
        assert_eq!(g.input.len(), 1);
        assert_eq!(g.input[0].name, INPUT_NAME);
        assert_eq!(g.output[0].name, OUTPUT_NAME);
        let shape = |v: &ValueInfoProto| match &v.r#type.as_ref().unwrap().value {
            Some(type_proto::Value::TensorType(t)) => t.shape.clone().unwrap().dim,
            None => panic!("no tensor type"),
        };
        use tensor_shape_proto::dimension::Value::{DimParam, DimValue};
        let dims: Vec<_> = shape(&g.input[0])
            .into_iter()
            .map(|d| d.value.unwrap())
            .collect();
        assert_eq!(
            dims,
            vec![DimParam("batch".into()), DimValue(6), DimValue(128)]
        );
        let dims: Vec<_> = shape(&g.output[0])
            .into_iter()
            .map(|d| d.value.unwrap())
            .collect();
        assert_eq!(dims, vec![DimParam("batch".into()), DimValue(5)]);
        let ops: std::collections::BTreeSet<_> =
            g.node.iter().map(|n| n.op_type.as_str()).collect();
        let allowed = [
            "Conv",
            "Relu",
            "GlobalAveragePool",
            "Flatten",
            "Gemm",
            "Softmax",
        ];
        assert!(ops.iter().all(|o| allowed.contains(o)), "{ops:?}");
        let params: usize = g
            .initializer
            .iter()
            .map(|t| t.dims.iter().product::<i64>() as usize)
            .sum();
        // Folding drops the batch-norm vectors but adds a conv bias of the same length.
        let bn_extra: usize = net.config().convs.iter().map(|c| c.out).sum();
        assert_eq!(params, net.param_count() - bn_extra);
    }
}
