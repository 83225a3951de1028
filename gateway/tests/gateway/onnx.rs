//! A tiny real ONNX model, so process-level tests need ONNX Runtime but not the trained model.
//!
//! Graph: `input [batch, C, T]` → `ReduceMean(axes=[2], keepdims=0)` → `[batch, C]` →
//! `Softmax(axis=1)` → `probabilities [batch, C]`. So there is one class per channel and the
//! class is the channel with the highest mean (standardised) value: the same rule as
//! [`super::support::MeanArgmax`], which makes results predictable from the raw rows.

use prost::Message;
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension,
    tensor_shape_proto::Dimension, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

fn dims(d: &[Option<i64>]) -> Option<TypeProto> {
    let dim = d
        .iter()
        .map(|v| Dimension {
            value: Some(match v {
                Some(n) => dimension::Value::DimValue(*n),
                None => dimension::Value::DimParam("batch".into()),
            }),
            ..Default::default()
        })
        .collect();
    Some(TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: DataType::Float as i32,
            shape: Some(TensorShapeProto { dim }),
        })),
        ..Default::default()
    })
}

fn attr_ints(name: &str, ints: Vec<i64>) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints,
        ..Default::default()
    }
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

/// ONNX bytes of the mean-argmax model for `channels` × `window` inputs.
pub fn mean_argmax(channels: usize, window: usize) -> Vec<u8> {
    mean_model(channels, window, true)
}

/// The channel means, with or without the softmax: without it the "probabilities" do not sum
/// to one, which a smoke run must catch.
pub fn mean_model(channels: usize, window: usize, softmax: bool) -> Vec<u8> {
    let (c, t) = (channels as i64, window as i64);
    let mean = NodeProto {
        op_type: "ReduceMean".into(),
        input: vec!["input".into()],
        output: vec![if softmax { "means" } else { "probabilities" }.into()],
        attribute: vec![attr_ints("axes", vec![2]), attr_int("keepdims", 0)],
        ..Default::default()
    };
    let mut node = vec![mean];
    if softmax {
        node.push(NodeProto {
            op_type: "Softmax".into(),
            input: vec!["means".into()],
            output: vec!["probabilities".into()],
            attribute: vec![attr_int("axis", 1)],
            ..Default::default()
        });
    }
    let graph = GraphProto {
        name: "mean-argmax".into(),
        node,
        input: vec![ValueInfoProto {
            name: "input".into(),
            r#type: dims(&[None, Some(c), Some(t)]),
            ..Default::default()
        }],
        output: vec![ValueInfoProto {
            name: "probabilities".into(),
            r#type: dims(&[None, Some(c)]),
            ..Default::default()
        }],
        ..Default::default()
    };
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        producer_name: "diredi-gateway-tests".into(),
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}
