//! Model dispatch over MQTT: a retained announcement, then the files in chunks.
//!
//! Data flow: cloud worker → **announcement** on `diredi/v1/{gw}/model` (or
//! `diredi/v1/fleet/model`), retained, so a gateway that connects later catches up →
//! **chunks** on `{model topic}/chunk/{version}/{file}/{index}`, retained too, so a gateway
//! that loses its connection half-way resumes by subscribing again → the gateway's
//! [`Assembly`] checks every chunk's sha256 and, at the end, every file's; the signed manifest
//! then goes through [`crate::manifest::ReceivedModel::verify`] as any model does.
//!
//! The announcement ([`DispatchMsg`]) carries the signed manifest and, for each file (the ONNX
//! model and the probe set), its size, sha256, chunk size and the sha256 of every chunk.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::manifest::sha256_hex;

/// Format tag of [`DispatchMsg`].
pub const DISPATCH_FORMAT: &str = "diredi-dispatch/1";

/// Largest file the gateway assembles (the shipped student is 130 kB).
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// The retained announcement of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DispatchMsg {
    /// [`DISPATCH_FORMAT`].
    pub format: String,
    /// The signed manifest, as JSON.
    pub manifest: Value,
    /// Manifest `version` (repeated here so chunk topics can be matched before parsing).
    pub version: u64,
    /// The files: index 0 is the ONNX model, then the probe set if the manifest names one.
    pub files: Vec<FileSpec>,
}

/// One file of a dispatch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    /// File name (one path component), as the manifest names it.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex sha256 of the whole file.
    pub sha256: String,
    /// Bytes per chunk (the last chunk may be shorter).
    pub chunk_size: u32,
    /// Lower-case hex sha256 of every chunk, in order.
    pub chunks: Vec<String>,
}

/// Errors of a dispatch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    /// The announcement is not what [`DispatchMsg`] describes.
    #[error("model announcement: {0}")]
    Announcement(String),
    /// A chunk does not belong to the announced files.
    #[error("chunk {file}/{index}: {reason}")]
    Chunk {
        /// File index.
        file: usize,
        /// Chunk index.
        index: usize,
        /// What is wrong.
        reason: String,
    },
}

impl DispatchMsg {
    /// Splits `files` (name, bytes) into chunks of `chunk_size` bytes and describes them.
    pub fn build(
        manifest: Value,
        version: u64,
        files: &[(String, Vec<u8>)],
        chunk_size: u32,
    ) -> (DispatchMsg, Vec<Vec<Vec<u8>>>) {
        let size = chunk_size.max(1) as usize;
        let mut specs = Vec::with_capacity(files.len());
        let mut chunks = Vec::with_capacity(files.len());
        for (name, bytes) in files {
            let parts: Vec<Vec<u8>> = if bytes.is_empty() {
                vec![Vec::new()]
            } else {
                bytes.chunks(size).map(<[u8]>::to_vec).collect()
            };
            specs.push(FileSpec {
                name: name.clone(),
                size: bytes.len() as u64,
                sha256: sha256_hex(bytes),
                chunk_size: size as u32,
                chunks: parts.iter().map(|c| sha256_hex(c)).collect(),
            });
            chunks.push(parts);
        }
        (
            DispatchMsg {
                format: DISPATCH_FORMAT.to_owned(),
                manifest,
                version,
                files: specs,
            },
            chunks,
        )
    }

    /// Parses and checks an announcement: format, file names, sizes and chunk counts.
    pub fn parse(payload: &[u8]) -> Result<DispatchMsg, DispatchError> {
        let msg: DispatchMsg = serde_json::from_slice(payload)
            .map_err(|e| DispatchError::Announcement(e.to_string()))?;
        if msg.format != DISPATCH_FORMAT {
            return Err(DispatchError::Announcement(format!(
                "format is {:?}; expected {DISPATCH_FORMAT:?}",
                msg.format
            )));
        }
        if msg.files.is_empty() {
            return Err(DispatchError::Announcement("no files".into()));
        }
        for f in &msg.files {
            // Exactly one normal component: not empty, not `.` or `..`, no separator.
            let mut parts = std::path::Path::new(&f.name).components();
            let plain = matches!(
                (parts.next(), parts.next()),
                (Some(std::path::Component::Normal(_)), None)
            );
            if !plain || f.name.contains('/') {
                return Err(DispatchError::Announcement(format!(
                    "file name {:?} is not one path component",
                    f.name
                )));
            }
            if f.size > MAX_FILE_BYTES || f.chunk_size == 0 {
                return Err(DispatchError::Announcement(format!(
                    "file {}: size {} or chunk size {} out of range",
                    f.name, f.size, f.chunk_size
                )));
            }
            let want = f.size.div_ceil(u64::from(f.chunk_size)).max(1);
            if f.chunks.len() as u64 != want {
                return Err(DispatchError::Announcement(format!(
                    "file {}: {} chunk hashes for {} bytes in chunks of {}",
                    f.name,
                    f.chunks.len(),
                    f.size,
                    f.chunk_size
                )));
            }
        }
        Ok(msg)
    }
}

/// Topic of chunk `index` of file `file` of `version`, under `model_topic`.
pub fn chunk_topic(model_topic: &str, version: u64, file: usize, index: usize) -> String {
    format!("{model_topic}/chunk/{version}/{file}/{index}")
}

/// Subscription filter for every chunk of `version` under `model_topic`.
pub fn chunk_filter(model_topic: &str, version: u64) -> String {
    format!("{model_topic}/chunk/{version}/#")
}

/// `(version, file, index)` of a chunk topic under `model_topic`.
pub fn parse_chunk_topic(model_topic: &str, topic: &str) -> Option<(u64, usize, usize)> {
    let rest = topic.strip_prefix(model_topic)?.strip_prefix("/chunk/")?;
    let mut it = rest.split('/');
    let v = it.next()?.parse().ok()?;
    let f = it.next()?.parse().ok()?;
    let i = it.next()?.parse().ok()?;
    it.next().is_none().then_some((v, f, i))
}

/// The files of one announcement, filled chunk by chunk. Sans-IO.
#[derive(Debug, Clone)]
pub struct Assembly {
    msg: DispatchMsg,
    parts: Vec<Vec<Option<Vec<u8>>>>,
    missing: usize,
}

impl Assembly {
    /// An empty assembly for `msg`.
    pub fn new(msg: DispatchMsg) -> Self {
        let parts: Vec<Vec<Option<Vec<u8>>>> = msg
            .files
            .iter()
            .map(|f| vec![None; f.chunks.len()])
            .collect();
        let missing = parts.iter().map(Vec::len).sum();
        Assembly {
            msg,
            parts,
            missing,
        }
    }

    /// The announcement.
    pub fn announcement(&self) -> &DispatchMsg {
        &self.msg
    }

    /// Takes chunk `index` of file `file`; a chunk already held is ignored (retained chunks
    /// are delivered again after a reconnection).
    pub fn accept(&mut self, file: usize, index: usize, bytes: &[u8]) -> Result<(), DispatchError> {
        let err = |reason: String| DispatchError::Chunk {
            file,
            index,
            reason,
        };
        let spec = self
            .msg
            .files
            .get(file)
            .ok_or_else(|| err(format!("only {} files announced", self.msg.files.len())))?;
        let want = spec
            .chunks
            .get(index)
            .ok_or_else(|| err(format!("file has {} chunks", spec.chunks.len())))?;
        let found = sha256_hex(bytes);
        if &found != want {
            return Err(err(format!(
                "sha256 {found}, announced {want} (corrupt or truncated)"
            )));
        }
        let slot = &mut self.parts[file][index];
        if slot.is_none() {
            *slot = Some(bytes.to_vec());
            self.missing -= 1;
        }
        Ok(())
    }

    /// Chunks still missing.
    pub fn missing(&self) -> usize {
        self.missing
    }

    /// Chunks announced.
    pub fn total(&self) -> usize {
        self.parts.iter().map(Vec::len).sum()
    }

    /// The files, once every chunk is in, each checked against its size and sha256.
    pub fn finish(&self) -> Result<Vec<(String, Vec<u8>)>, DispatchError> {
        let mut out = Vec::with_capacity(self.parts.len());
        for (i, (spec, parts)) in self.msg.files.iter().zip(&self.parts).enumerate() {
            let mut bytes = Vec::with_capacity(spec.size as usize);
            for (j, p) in parts.iter().enumerate() {
                let p = p.as_ref().ok_or_else(|| DispatchError::Chunk {
                    file: i,
                    index: j,
                    reason: "missing".into(),
                })?;
                bytes.extend_from_slice(p);
            }
            if bytes.len() as u64 != spec.size || sha256_hex(&bytes) != spec.sha256 {
                return Err(DispatchError::Chunk {
                    file: i,
                    index: parts.len(),
                    reason: format!("file {} does not match its size and sha256", spec.name),
                });
            }
            out.push((spec.name.clone(), bytes));
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn files() -> Vec<(String, Vec<u8>)> {
        vec![
            (
                "m-v2.onnx".into(),
                (0..1000u32).map(|i| (i % 251) as u8).collect(),
            ),
            ("m-v2.probe".into(), b"probe".to_vec()),
        ]
    }

    #[test]
    fn chunks_in_any_order_and_repeated_assemble_the_files() {
        let (msg, chunks) = DispatchMsg::build(serde_json::json!({"v": 2}), 2, &files(), 300);
        let parsed = DispatchMsg::parse(&serde_json::to_vec(&msg).unwrap()).unwrap();
        assert_eq!(parsed.files[0].chunks.len(), 4);
        let mut a = Assembly::new(parsed);
        assert_eq!(a.total(), 5);
        for (f, parts) in chunks.iter().enumerate().rev() {
            for (i, c) in parts.iter().enumerate().rev() {
                a.accept(f, i, c).unwrap();
                a.accept(f, i, c).unwrap(); // retained again after a reconnection
            }
        }
        assert_eq!(a.missing(), 0);
        assert_eq!(a.finish().unwrap(), files());
    }

    #[test]
    fn truncated_or_foreign_chunks_are_refused() {
        let (msg, chunks) = DispatchMsg::build(Value::Null, 2, &files(), 300);
        let mut a = Assembly::new(msg);
        let cut = &chunks[0][1][..299];
        assert!(matches!(
            a.accept(0, 1, cut),
            Err(DispatchError::Chunk { index: 1, .. })
        ));
        assert!(a.accept(0, 9, &chunks[0][0]).is_err());
        assert!(a.accept(5, 0, &chunks[0][0]).is_err());
        assert!(a.finish().is_err(), "incomplete");
        assert_eq!(a.missing(), 5);
    }

    #[test]
    fn bad_announcements_are_refused() {
        let (mut msg, _) = DispatchMsg::build(Value::Null, 2, &files(), 300);
        msg.files[0].name = "../etc/passwd".into();
        assert!(DispatchMsg::parse(&serde_json::to_vec(&msg).unwrap()).is_err());
        let (mut msg, _) = DispatchMsg::build(Value::Null, 2, &files(), 300);
        msg.files[0].chunks.pop();
        assert!(DispatchMsg::parse(&serde_json::to_vec(&msg).unwrap()).is_err());
        assert!(DispatchMsg::parse(b"\xff").is_err());
    }

    #[test]
    fn chunk_topics_round_trip() {
        let t = chunk_topic("diredi/v1/gw/model", 3, 1, 17);
        assert_eq!(t, "diredi/v1/gw/model/chunk/3/1/17");
        assert_eq!(
            parse_chunk_topic("diredi/v1/gw/model", &t),
            Some((3, 1, 17))
        );
        assert_eq!(
            parse_chunk_topic("diredi/v1/gw/model", "diredi/v1/gw/model/chunk/3/1"),
            None
        );
        assert_eq!(
            chunk_filter("diredi/v1/gw/model", 3),
            "diredi/v1/gw/model/chunk/3/#"
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod proptests {
    //! Properties of the chunk topics, the announcement and the assembly: what the cloud
    //! builds the gateway parses and reassembles, whatever the order and repetition of the
    //! chunks, and a damaged chunk is refused.

    use super::*;
    use proptest::prelude::*;

    fn files() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
        proptest::collection::vec(
            (
                "[a-z0-9][a-z0-9.-]{0,11}",
                proptest::collection::vec(any::<u8>(), 0..300),
            ),
            1..4,
        )
    }

    /// Found by the `dispatch_chunks` fuzz target: `.` and `..` are one path component each,
    /// so they passed the file-name check, and the gateway would have written a dispatched file
    /// to its staging directory itself (`.`) or to the model store above it (`..`).
    #[test]
    fn dot_and_dot_dot_file_names_are_refused() {
        for name in [".", "..", "", "a/b", "/", "./a"] {
            let (msg, _) = DispatchMsg::build(Value::Null, 2, &[(name.into(), Vec::new())], 4);
            let err = DispatchMsg::parse(&serde_json::to_vec(&msg).unwrap()).unwrap_err();
            assert!(
                err.to_string().contains("one path component"),
                "{name:?}: {err}"
            );
        }
        for name in ["m-v2.onnx", "...", ".probe", "a..b"] {
            let (msg, _) = DispatchMsg::build(Value::Null, 2, &[(name.into(), Vec::new())], 4);
            assert!(
                DispatchMsg::parse(&serde_json::to_vec(&msg).unwrap()).is_ok(),
                "{name:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn chunk_topics_round_trip(
            model_topic in "[a-z0-9/]{0,24}",
            version in any::<u64>(),
            file in any::<usize>(),
            index in any::<usize>(),
        ) {
            let topic = chunk_topic(&model_topic, version, file, index);
            prop_assert_eq!(parse_chunk_topic(&model_topic, &topic), Some((version, file, index)));
            prop_assert!(chunk_filter(&model_topic, version).ends_with("/#"));
        }

        #[test]
        fn a_parsed_chunk_topic_formats_back_to_the_same_numbers(
            tail in "[0-9+a/]{0,24}",
        ) {
            let model_topic = "diredi/v1/gw/model";
            let topic = format!("{model_topic}/chunk/{tail}");
            if let Some((v, f, i)) = parse_chunk_topic(model_topic, &topic) {
                let canonical = chunk_topic(model_topic, v, f, i);
                prop_assert_eq!(parse_chunk_topic(model_topic, &canonical), Some((v, f, i)));
            }
            prop_assert_eq!(parse_chunk_topic("other/model", &topic), None);
        }

        #[test]
        fn any_bytes_as_an_announcement_give_a_typed_error_or_a_checked_one(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            if let Ok(msg) = DispatchMsg::parse(&bytes) {
                prop_assert_eq!(msg.format.as_str(), DISPATCH_FORMAT);
                prop_assert!(!msg.files.is_empty());
            }
        }

        #[test]
        fn chunks_in_any_order_and_repeated_rebuild_the_files(
            files in files(),
            chunk_size in 1u32..128,
            order in any::<u64>(),
        ) {
            let (msg, chunks) = DispatchMsg::build(Value::Null, 7, &files, chunk_size);
            let parsed = DispatchMsg::parse(&serde_json::to_vec(&msg).unwrap()).unwrap();
            prop_assert_eq!(&parsed, &msg);
            let mut all: Vec<(usize, usize)> = chunks
                .iter()
                .enumerate()
                .flat_map(|(f, parts)| (0..parts.len()).map(move |i| (f, i)))
                .collect();
            // A cheap deterministic shuffle with repeats: every chunk, then every third again.
            let n = all.len();
            all.rotate_left(usize::try_from(order % n as u64).unwrap());
            all.extend(all.clone().into_iter().step_by(3));
            let mut a = Assembly::new(parsed);
            prop_assert_eq!(a.total(), n);
            for (k, &(f, i)) in all.iter().enumerate() {
                prop_assert!(a.finish().is_err());
                a.accept(f, i, &chunks[f][i]).unwrap();
                prop_assert_eq!(a.missing(), n.saturating_sub(k + 1));
                if a.missing() == 0 {
                    break;
                }
            }
            prop_assert_eq!(a.finish().unwrap(), files);
        }

        #[test]
        fn a_damaged_chunk_is_refused_and_changes_nothing(
            files in files(),
            chunk_size in 1u32..64,
            pick in any::<proptest::sample::Index>(),
            at in any::<proptest::sample::Index>(),
            damage in 0u8..3,
        ) {
            let (msg, chunks) = DispatchMsg::build(Value::Null, 7, &files, chunk_size);
            let all: Vec<(usize, usize)> = chunks
                .iter()
                .enumerate()
                .flat_map(|(f, parts)| (0..parts.len()).map(move |i| (f, i)))
                .collect();
            let (f, i) = *pick.get(&all);
            let mut bytes = chunks[f][i].clone();
            let at = at.index(bytes.len().max(1));
            match damage {
                0 if !bytes.is_empty() => bytes[at] ^= 0x01,
                1 if !bytes.is_empty() => bytes.truncate(at),
                _ => bytes.push(0),
            }
            let mut a = Assembly::new(msg);
            let err = a.accept(f, i, &bytes).unwrap_err();
            let named = matches!(err, DispatchError::Chunk { file, index, .. } if (file, index) == (f, i));
            prop_assert!(named, "{err}");
            prop_assert_eq!(a.missing(), all.len());
        }
    }
}
