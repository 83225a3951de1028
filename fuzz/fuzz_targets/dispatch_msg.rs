//! Model announcements (`diredi/v1/{gw}/model`, `DispatchMsg::parse`): never panics; what is
//! accepted names files by one plain path component, within the size bound, with one chunk
//! hash per chunk; it survives a JSON round trip; an assembly for it starts empty and takes
//! exactly the chunks whose sha256 is announced.
#![no_main]

use std::path::{Component, Path};

use diredi_protocol::dispatch::{Assembly, DispatchMsg, DISPATCH_FORMAT, MAX_FILE_BYTES};
use diredi_protocol::sha256_hex;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = DispatchMsg::parse(data) else {
        return;
    };
    assert_eq!(msg.format, DISPATCH_FORMAT);
    assert!(!msg.files.is_empty());
    for f in &msg.files {
        let mut parts = Path::new(&f.name).components();
        assert!(
            matches!(
                (parts.next(), parts.next()),
                (Some(Component::Normal(_)), None)
            ) && !f.name.contains('/'),
            "file name {:?} accepted",
            f.name
        );
        assert!(f.size <= MAX_FILE_BYTES && f.chunk_size > 0);
        let want = f.size.div_ceil(u64::from(f.chunk_size)).max(1);
        assert_eq!(f.chunks.len() as u64, want);
    }
    let text = serde_json::to_vec(&msg).expect("an announcement serialises");
    assert_eq!(DispatchMsg::parse(&text).as_ref(), Ok(&msg));

    let total: usize = msg.files.iter().map(|f| f.chunks.len()).sum();
    let mut a = Assembly::new(msg.clone());
    assert_eq!((a.total(), a.missing()), (total, total));
    assert!(a.finish().is_err());
    // Pieces of the input offered as chunks: taken only if their hash is the announced one.
    let mut offered = data.chunks(7);
    for (f, spec) in msg.files.iter().enumerate() {
        for (i, want) in spec.chunks.iter().enumerate().take(4) {
            let bytes = offered.next().unwrap_or(b"");
            let ok = a.accept(f, i, bytes).is_ok();
            assert_eq!(ok, sha256_hex(bytes) == *want);
        }
        assert!(a.accept(f, spec.chunks.len(), b"").is_err());
    }
    assert!(a.accept(msg.files.len(), 0, b"").is_err());
});
