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

use prost::Message;
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

use crate::model::{FoldedDense, ModelError, Net};

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
