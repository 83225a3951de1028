//! Model chunks (`{model topic}/chunk/{version}/{file}/{index}`): the cloud's `DispatchMsg::build`
//! against the gateway's `DispatchMsg::parse`, `parse_chunk_topic`, `Topics::route` and
//! `Assembly`, with chunks delivered in any order, repeated, truncated, corrupted, extended,
//! swapped or foreign. The assembly takes exactly the intact chunks, counts what is missing,
//! and gives back the very files that were sent once, and only once, every chunk is in.
#![no_main]

use std::collections::HashSet;
use std::path::{Component, Path};

use arbitrary::Arbitrary;
use diredi_protocol::dispatch::{chunk_topic, parse_chunk_topic, Assembly, DispatchMsg};
use diredi_protocol::topics::{Route, Topics, FLEET_MODEL};
use libfuzzer_sys::fuzz_target;

const MAX_FILES: usize = 3;
const MAX_FILE_LEN: usize = 4096;
const MAX_OPS: usize = 64;

#[derive(Debug, Arbitrary)]
struct Input {
    fleet: bool,
    version: u64,
    chunk_size: u16,
    files: Vec<(String, Vec<u8>)>,
    ops: Vec<Op>,
    /// A topic as it might arrive from the broker.
    topic: String,
}

#[derive(Debug, Arbitrary)]
struct Op {
    file: u8,
    index: u16,
    how: How,
}

#[derive(Debug, Arbitrary)]
enum How {
    Intact,
    Truncated(u16),
    Flipped(u16, u8),
    Extended(u8),
    /// Chunk `index` of file `file`, delivered in this op's place.
    Swapped(u8, u16),
    Foreign(Vec<u8>),
}

fn plain_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(Component::Normal(_)), None)
    ) && !name.contains('/')
}

fuzz_target!(|input: Input| {
    let topics = Topics::new("gw").expect("a valid gateway id");
    let model_topic = if input.fleet {
        FLEET_MODEL.to_owned()
    } else {
        topics.model()
    };

    // A broker topic: parsing never panics, and what parses is a chunk topic that formats back
    // to the same numbers.
    if let Some((v, f, i)) = parse_chunk_topic(&model_topic, &input.topic) {
        let canonical = chunk_topic(&model_topic, v, f, i);
        assert_eq!(parse_chunk_topic(&model_topic, &canonical), Some((v, f, i)));
        assert_eq!(topics.route(&input.topic), Route::ModelChunk);
    } else {
        let _ = topics.route(&input.topic);
    }

    let mut files = input.files;
    files.truncate(MAX_FILES);
    for (_, bytes) in &mut files {
        bytes.truncate(MAX_FILE_LEN);
    }
    let chunk_size = u32::from(input.chunk_size % 1024) + 1;
    let manifest = serde_json::json!({ "version": input.version });
    let (msg, chunks) = DispatchMsg::build(manifest, input.version, &files, chunk_size);
    let text = serde_json::to_vec(&msg).expect("an announcement serialises");
    let valid = !files.is_empty() && files.iter().all(|(name, _)| plain_name(name));
    let parsed = match DispatchMsg::parse(&text) {
        Ok(parsed) => parsed,
        Err(e) => {
            assert!(!valid, "a valid announcement is refused: {e}");
            return;
        }
    };
    assert!(valid, "an announcement with names {files:?} is accepted");
    assert_eq!(parsed, msg);

    let total: usize = chunks.iter().map(Vec::len).sum();
    let mut a = Assembly::new(parsed);
    assert_eq!((a.total(), a.missing()), (total, total));
    let mut held = HashSet::new();
    for op in input.ops.iter().take(MAX_OPS) {
        // One past the end on both axes, so out-of-range chunks are tried too.
        let f = usize::from(op.file) % (files.len() + 1);
        let i = usize::from(op.index) % (chunks.get(f).map_or(0, Vec::len) + 1);
        let real = chunks.get(f).and_then(|c| c.get(i));
        let mut bytes = real.cloned().unwrap_or_default();
        match &op.how {
            How::Intact => {}
            How::Truncated(n) => bytes.truncate(usize::from(*n) % (bytes.len() + 1)),
            How::Flipped(at, mask) => {
                let at = usize::from(*at) % bytes.len().max(1);
                if let Some(b) = bytes.get_mut(at) {
                    *b ^= mask;
                }
            }
            How::Extended(b) => bytes.push(*b),
            How::Swapped(g, j) => {
                let g = usize::from(*g) % files.len();
                let j = usize::from(*j) % chunks[g].len();
                bytes.clone_from(&chunks[g][j]);
            }
            How::Foreign(other) => bytes.clone_from(other),
        }
        let topic = chunk_topic(&model_topic, input.version, f, i);
        assert_eq!(
            parse_chunk_topic(&model_topic, &topic),
            Some((input.version, f, i))
        );
        assert_eq!(topics.route(&topic), Route::ModelChunk);

        let accepted = a.accept(f, i, &bytes).is_ok();
        // sha256 stands for the bytes: a collision would be a finding of its own.
        assert_eq!(accepted, real == Some(&bytes), "chunk {f}/{i}");
        if accepted {
            held.insert((f, i));
        }
        assert_eq!(a.missing(), total - held.len());
        assert_eq!(a.finish().is_ok(), held.len() == total);
    }
    // The rest, last first: the files come back exactly.
    for (f, parts) in chunks.iter().enumerate().rev() {
        for (i, c) in parts.iter().enumerate().rev() {
            a.accept(f, i, c).expect("an intact chunk is taken");
        }
    }
    assert_eq!(a.missing(), 0);
    assert_eq!(a.finish().expect("every chunk is in"), files);
});
