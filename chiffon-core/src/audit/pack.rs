//! A batch of git objects written as one pack file and its index, by hand.
//!
//! The trail knows exactly what each of its commits changes: one record added, so each of
//! the three folders on its path gains or replaces one entry. libgit2's pack builder does
//! not know that: it hashed every object into an in-memory store, searched a window of
//! candidates for each object's best delta, compressed, and its indexer then inflated every
//! object again, re-applied every delta and hashed everything a second time (together about
//! a fifth of the benchmark process's CPU). Here each object is hashed once, a folder that
//! changed since its previous version in the batch is stored as a delta against it (copy
//! the unchanged head, insert the new entry, copy the unchanged tail), and the index is
//! written from what is already known: ids, offsets and checksums.
//!
//! The format is git's own (pack version 2 with `OFS_DELTA` entries, index version 2), as
//! `git index-pack` and `git fsck` read it. A delta chain is at most [`MAX_DEPTH`] long
//! (git's default), and its base is always earlier in the same pack, so each pack stands on
//! its own and can be concatenated whole with others (see `concat_packs`).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use git2::{ObjectType, Oid};
use sha1::Digest as _;

/// Longest delta chain (git's `pack.depth` default): reading the newest version of a
/// folder applies at most this many deltas.
const MAX_DEPTH: u32 = 50;

/// zlib level of the pack's entries: records are small JSON documents and deltas a few
/// dozen bytes, where the fastest level compresses nearly as well as the default.
const LEVEL: u32 = 1;

/// An entry of a pack index: the object's id, its offset in the pack and the CRC-32 of its
/// bytes there.
pub(crate) type IndexEntry = (Oid, u64, u32);

/// One entry written: what the index needs.
struct Entry {
    oid: Oid,
    offset: u64,
    crc: u32,
}

/// Where an object is in the pack being built, for a later delta against it.
#[derive(Clone, Copy, Debug)]
struct Placed {
    offset: u64,
    depth: u32,
}

/// A pack being built in memory.
pub(crate) struct PackBuilder {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
    placed: HashMap<Oid, Placed>,
    z: flate2::Compress,
}

fn kind_name(kind: ObjectType) -> &'static str {
    match kind {
        ObjectType::Commit => "commit",
        ObjectType::Tree => "tree",
        ObjectType::Tag => "tag",
        _ => "blob",
    }
}

fn kind_code(kind: ObjectType) -> u8 {
    match kind {
        ObjectType::Commit => 1,
        ObjectType::Tree => 2,
        ObjectType::Tag => 4,
        _ => 3,
    }
}

/// The id git gives an object of `kind` with content `data`.
pub(crate) fn object_id(kind: ObjectType, data: &[u8]) -> Oid {
    let mut h = sha1::Sha1::new();
    h.update(kind_name(kind).as_bytes());
    h.update(b" ");
    h.update(data.len().to_string().as_bytes());
    h.update([0u8]);
    h.update(data);
    Oid::from_bytes(&h.finalize()).unwrap_or(Oid::ZERO_SHA1)
}

/// Appends `data` to `out` as one zlib stream, through `z` (reset first: one compressor's
/// state, a quarter of a megabyte, serves every object of a pack instead of being set up
/// for each).
fn deflate_into(z: &mut flate2::Compress, data: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
    z.reset();
    let start_in = z.total_in();
    loop {
        // Room for more output each round (`compress_vec` fills only spare capacity).
        out.reserve(data.len() / 8 + 64);
        let done = usize::try_from(z.total_in() - start_in).unwrap_or(data.len());
        match z.compress_vec(&data[done..], out, flate2::FlushCompress::Finish) {
            Ok(flate2::Status::StreamEnd) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
}

/// Insert instructions for `bytes` (at most 127 bytes each).
fn push_insert(out: &mut Vec<u8>, bytes: &[u8]) {
    for chunk in bytes.chunks(127) {
        out.push(chunk.len() as u8);
        out.extend_from_slice(chunk);
    }
}

/// A variable-length size as in a delta's header: 7 bits a byte, low bits first.
fn push_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A copy instruction: `len` bytes of the base from `offset`.
fn push_copy(out: &mut Vec<u8>, mut offset: usize, mut len: usize) {
    while len > 0 {
        // At most 0xffffff per instruction (a size of 0x10000 could be written as 0, but a
        // three-byte size covers it).
        let n = len.min(0x00ff_ffff);
        let at = out.len();
        out.push(0x80);
        let mut op = 0x80u8;
        for i in 0..4 {
            let b = ((offset >> (8 * i)) & 0xff) as u8;
            if b != 0 {
                op |= 1 << i;
                out.push(b);
            }
        }
        for i in 0..3 {
            let b = ((n >> (8 * i)) & 0xff) as u8;
            if b != 0 {
                op |= 1 << (4 + i);
                out.push(b);
            }
        }
        out[at] = op;
        offset += n;
        len -= n;
    }
}

/// A delta that turns `base` into `target` by copying their common head and tail and
/// inserting what differs between them: the right shape for a folder that gained or
/// changed one entry. `None` when it would not be clearly smaller than `target` itself, or
/// when the base is too large to address.
fn head_tail_delta(base: &[u8], target: &[u8]) -> Option<Vec<u8>> {
    if base.len() > u32::MAX as usize {
        return None;
    }
    let head = base.iter().zip(target).take_while(|(a, b)| a == b).count();
    let max_tail = base.len().min(target.len()) - head;
    let tail = base
        .iter()
        .rev()
        .zip(target.iter().rev())
        .take(max_tail)
        .take_while(|(a, b)| a == b)
        .count();
    let middle = &target[head..target.len() - tail];
    let mut out = Vec::with_capacity(24 + middle.len() + middle.len() / 127 + 1);
    push_varint(&mut out, base.len());
    push_varint(&mut out, target.len());
    push_copy(&mut out, 0, head);
    push_insert(&mut out, middle);
    push_copy(&mut out, base.len() - tail, tail);
    (out.len() * 2 < target.len()).then_some(out)
}

/// Bytes of the blocks [`block_delta`] indexes its base by (as git's own delta search).
const BLOCK: usize = 16;

/// A hasher for the blocks' keys (a block's 16 bytes as a `u128`): one multiply, where the
/// default SipHash would cost more than the rest of the search.
#[derive(Default)]
struct BlockHasher(u64);

impl std::hash::Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u128(&mut self, n: u128) {
        let folded = (n as u64) ^ ((n >> 64) as u64).rotate_left(29);
        self.0 = folded.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A delta that builds `target` from `base` as git's own delta search does, simplified:
/// `base` is indexed by its aligned 16-byte blocks, and wherever `target` has one of them,
/// the match is grown both ways and copied; the rest is inserted. The right shape for two
/// records or two commits of a batch, which differ in a few places (ids, times) and share
/// the rest. `None` when it would not be smaller than `target` itself.
fn block_delta(base: &[u8], target: &[u8]) -> Option<Vec<u8>> {
    if base.len() > u32::MAX as usize || base.len() < BLOCK || target.len() < BLOCK {
        return None;
    }
    let key = |b: &[u8]| u128::from_le_bytes(b.try_into().unwrap_or([0; BLOCK]));
    let mut index: HashMap<u128, usize, std::hash::BuildHasherDefault<BlockHasher>> =
        HashMap::with_capacity_and_hasher(base.len() / BLOCK, Default::default());
    for (k, block) in base.chunks_exact(BLOCK).enumerate() {
        index.entry(key(block)).or_insert(k * BLOCK);
    }
    let mut out = Vec::with_capacity(target.len() / 4 + 16);
    push_varint(&mut out, base.len());
    push_varint(&mut out, target.len());
    // Target bytes before `i` are in the delta up to `pending` (inserted later, or copied).
    let (mut i, mut pending) = (0, 0);
    while i + BLOCK <= target.len() {
        let Some(&at) = index.get(&key(&target[i..i + BLOCK])) else {
            i += 1;
            continue;
        };
        let (mut t0, mut b0) = (i, at);
        while t0 > pending && b0 > 0 && target[t0 - 1] == base[b0 - 1] {
            t0 -= 1;
            b0 -= 1;
        }
        let (mut t1, mut b1) = (i + BLOCK, at + BLOCK);
        while t1 < target.len() && b1 < base.len() && target[t1] == base[b1] {
            t1 += 1;
            b1 += 1;
        }
        push_insert(&mut out, &target[pending..t0]);
        push_copy(&mut out, b0, t1 - t0);
        i = t1;
        pending = t1;
    }
    push_insert(&mut out, &target[pending..]);
    (out.len() + BLOCK < target.len()).then_some(out)
}

/// Applies a git delta to `base` (for tests and checks).
#[cfg(test)]
fn apply_delta(base: &[u8], delta: &[u8]) -> Option<Vec<u8>> {
    let mut i = 0;
    let varint = |i: &mut usize| -> Option<usize> {
        let mut n = 0usize;
        let mut shift = 0;
        loop {
            let b = *delta.get(*i)?;
            *i += 1;
            n |= ((b & 0x7f) as usize) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
    };
    if varint(&mut i)? != base.len() {
        return None;
    }
    let size = varint(&mut i)?;
    let mut out = Vec::with_capacity(size);
    while i < delta.len() {
        let op = delta[i];
        i += 1;
        if op & 0x80 != 0 {
            let mut offset = 0usize;
            let mut len = 0usize;
            for b in 0..4 {
                if op & (1 << b) != 0 {
                    offset |= (*delta.get(i)? as usize) << (8 * b);
                    i += 1;
                }
            }
            for b in 0..3 {
                if op & (1 << (4 + b)) != 0 {
                    len |= (*delta.get(i)? as usize) << (8 * b);
                    i += 1;
                }
            }
            if len == 0 {
                len = 0x10000;
            }
            out.extend_from_slice(base.get(offset..offset.checked_add(len)?)?);
        } else if op != 0 {
            out.extend_from_slice(delta.get(i..i + op as usize)?);
            i += op as usize;
        } else {
            return None;
        }
    }
    (out.len() == size).then_some(out)
}

impl PackBuilder {
    pub(crate) fn new() -> PackBuilder {
        let mut bytes = Vec::with_capacity(64 * 1024);
        // The count is filled in when the pack is finished.
        bytes.extend_from_slice(b"PACK\0\0\0\x02\0\0\0\0");
        PackBuilder {
            bytes,
            entries: Vec::new(),
            placed: HashMap::new(),
            z: flate2::Compress::new(flate2::Compression::new(LEVEL), true),
        }
    }

    fn header(&mut self, code: u8, size: usize) {
        let mut byte = (code << 4) | (size & 0x0f) as u8;
        let mut rest = size >> 4;
        while rest != 0 {
            self.bytes.push(byte | 0x80);
            byte = (rest & 0x7f) as u8;
            rest >>= 7;
        }
        self.bytes.push(byte);
    }

    /// Adds an object and returns its id: as a delta against `base` (an object added to
    /// this pack before, with its content) when that is smaller and the chain not too
    /// long, whole otherwise. An object already in the pack is not added twice.
    pub(crate) fn add(
        &mut self,
        kind: ObjectType,
        data: &[u8],
        base: Option<(Oid, &[u8])>,
    ) -> std::io::Result<Oid> {
        let oid = object_id(kind, data);
        if self.placed.contains_key(&oid) {
            return Ok(oid);
        }
        let delta = base.and_then(|(base, base_data)| {
            let b = self.placed.get(&base).copied()?;
            if b.depth >= MAX_DEPTH {
                return None;
            }
            // A folder gains one entry; a record or a commit differs in a few places.
            let delta = if kind == ObjectType::Tree {
                head_tail_delta(base_data, data)
            } else {
                block_delta(base_data, data)
            };
            delta.map(|d| (b, d))
        });
        let offset = self.bytes.len() as u64;
        let depth = match delta {
            None => {
                self.header(kind_code(kind), data.len());
                deflate_into(&mut self.z, data, &mut self.bytes)?;
                0
            }
            Some((b, delta)) => {
                self.header(6, delta.len());
                // The distance back to the base, in git's offset encoding (each
                // continuation adds one before shifting).
                let mut distance = offset - b.offset;
                let mut enc = vec![(distance & 0x7f) as u8];
                distance >>= 7;
                while distance != 0 {
                    distance -= 1;
                    enc.push(0x80 | (distance & 0x7f) as u8);
                    distance >>= 7;
                }
                enc.reverse();
                self.bytes.extend_from_slice(&enc);
                deflate_into(&mut self.z, &delta, &mut self.bytes)?;
                b.depth + 1
            }
        };
        let crc = crc32fast::hash(&self.bytes[offset as usize..]);
        self.entries.push(Entry { oid, offset, crc });
        self.placed.insert(oid, Placed { offset, depth });
        Ok(oid)
    }

    /// The finished pack (count and checksum filled in) and its index.
    pub(crate) fn finish(mut self) -> (Vec<u8>, Vec<u8>) {
        let count = self.entries.len() as u32;
        self.bytes[8..12].copy_from_slice(&count.to_be_bytes());
        let checksum = sha1::Sha1::digest(&self.bytes);
        self.bytes.extend_from_slice(&checksum);
        let idx = build_index(
            self.entries
                .into_iter()
                .map(|e| (e.oid, e.offset, e.crc))
                .collect(),
            &checksum,
        );
        (self.bytes, idx)
    }
}

/// A version 2 pack index for the entries `(id, offset, crc32)` of the pack whose checksum
/// is `pack_checksum`.
pub(crate) fn build_index(mut entries: Vec<IndexEntry>, pack_checksum: &[u8]) -> Vec<u8> {
    entries.sort_unstable_by_key(|e| e.0);
    entries.dedup_by_key(|e| e.0);
    let n = entries.len();
    let mut idx = Vec::with_capacity(8 + 1024 + n * 28 + 40);
    idx.extend_from_slice(&[0xff, b't', b'O', b'c', 0, 0, 0, 2]);
    let mut fanout = [0u32; 256];
    for (oid, _, _) in &entries {
        fanout[oid.as_bytes()[0] as usize] += 1;
    }
    let mut sum = 0u32;
    for f in fanout {
        sum += f;
        idx.extend_from_slice(&sum.to_be_bytes());
    }
    for (oid, _, _) in &entries {
        idx.extend_from_slice(oid.as_bytes());
    }
    for (_, _, crc) in &entries {
        idx.extend_from_slice(&crc.to_be_bytes());
    }
    let mut large = Vec::new();
    for (_, offset, _) in &entries {
        if *offset < 0x8000_0000 {
            idx.extend_from_slice(&(*offset as u32).to_be_bytes());
        } else {
            let at = 0x8000_0000u32 | (large.len() / 8) as u32;
            idx.extend_from_slice(&at.to_be_bytes());
            large.extend_from_slice(&offset.to_be_bytes());
        }
    }
    idx.extend_from_slice(&large);
    idx.extend_from_slice(pack_checksum);
    let checksum = sha1::Sha1::digest(&idx);
    idx.extend_from_slice(&checksum);
    idx
}

/// The entries `(id, offset, crc32)` a version 2 pack index lists.
pub(crate) fn read_index(idx: &[u8]) -> Option<Vec<IndexEntry>> {
    if idx.len() < 8 + 1024 + 40 || idx[..8] != [0xff, b't', b'O', b'c', 0, 0, 0, 2] {
        return None;
    }
    let be32 = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(idx.get(at..at + 4)?.try_into().ok()?))
    };
    let n = be32(8 + 1020)? as usize;
    let names = 8 + 1024;
    let crcs = names + n * 20;
    let offsets = crcs + n * 4;
    let large = offsets + n * 4;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let oid = Oid::from_bytes(idx.get(names + i * 20..names + i * 20 + 20)?).ok()?;
        let crc = be32(crcs + i * 4)?;
        let small = be32(offsets + i * 4)?;
        let offset = if small & 0x8000_0000 == 0 {
            small as u64
        } else {
            let at = large + (small & 0x7fff_ffff) as usize * 8;
            u64::from_be_bytes(idx.get(at..at + 8)?.try_into().ok()?)
        };
        out.push((oid, offset, crc));
    }
    Some(out)
}

/// Writes `pack` and its `idx` into `pack_dir` as `pack-SUM.pack` and `pack-SUM.idx`, each
/// through a temporary file that is synced before it is renamed into place, the pack before
/// its index (a reader finds a pack by its index), then syncs the folder: when this returns,
/// a power loss keeps both.
pub(crate) fn write_to(pack_dir: &Path, pack: &[u8], idx: &[u8]) -> std::io::Result<()> {
    let (tmp, mut file) = temp_file(pack_dir, "pack")?;
    let synced = file.write_all(pack).and_then(|()| file.sync_all());
    if let Err(e) = synced {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    install(pack_dir, &tmp, &pack[pack.len().saturating_sub(20)..], idx)
}

/// A new temporary file in `pack_dir` (named as no pack is, and unique across processes)
/// and its path.
pub(crate) fn temp_file(pack_dir: &Path, ext: &str) -> std::io::Result<(PathBuf, std::fs::File)> {
    let tmp = pack_dir.join(format!(
        "tmp_chiffon_{}_{}.{ext}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let file = std::fs::File::create_new(&tmp)?;
    Ok((tmp, file))
}

/// Renames the pack at `tmp_pack` (already synced) into `pack_dir` as `pack-SUM.pack`,
/// `SUM` being its checksum `sum`, then writes its index `idx` the same way (through a
/// synced temporary file) and syncs the folder. The temporary pack is removed when it
/// cannot be renamed.
pub(crate) fn install(
    pack_dir: &Path,
    tmp_pack: &Path,
    sum: &[u8],
    idx: &[u8],
) -> std::io::Result<()> {
    let sum = hex::encode(sum);
    let moved = std::fs::rename(tmp_pack, pack_dir.join(format!("pack-{sum}.pack")));
    if let Err(e) = moved {
        let _ = std::fs::remove_file(tmp_pack);
        return Err(e);
    }
    let (tmp, mut file) = temp_file(pack_dir, "idx")?;
    let done = file
        .write_all(idx)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, pack_dir.join(format!("pack-{sum}.idx"))));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done?;
    std::fs::File::open(pack_dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_tail_delta_rebuilds_the_target() {
        let base: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        for (at, insert, remove) in [
            (0, 29, 0),
            (2500, 29, 0),
            (4999, 29, 0),
            (1200, 29, 29),
            (4000, 300, 0),
        ] {
            let mut target = base.clone();
            let new: Vec<u8> = (0..insert).map(|i| (i * 13 + 5) as u8).collect();
            target.splice(at..at + remove, new);
            let delta = head_tail_delta(&base, &target).expect("a small change gives a delta");
            assert!(delta.len() < 400, "{}", delta.len());
            assert_eq!(apply_delta(&base, &delta).as_deref(), Some(&target[..]));
        }
        // Nothing in common: no delta.
        assert!(head_tail_delta(&[1; 100], &[2; 100]).is_none());
    }

    #[test]
    fn a_block_delta_rebuilds_the_target() {
        let base: String = (0..60)
            .map(|i| format!("  \"key number {i}\": \"value {i}\",\n"))
            .collect();
        let mut target = base
            .replace("value 7\"", "other 7\"")
            .replace("key number 30", "key 30");
        target.insert_str(0, "{\n");
        target.push('}');
        let delta = block_delta(base.as_bytes(), target.as_bytes()).expect("mostly shared");
        assert!(delta.len() < 100, "{}", delta.len());
        assert_eq!(
            apply_delta(base.as_bytes(), &delta).as_deref(),
            Some(target.as_bytes())
        );
        // Parts moved about are still copied, each from where it is.
        let moved: String = base.lines().rev().map(|l| format!("{l}\n")).collect();
        let delta = block_delta(base.as_bytes(), moved.as_bytes()).unwrap();
        assert_eq!(
            apply_delta(base.as_bytes(), &delta).as_deref(),
            Some(moved.as_bytes())
        );
        // Nothing in common, or too short to index: no delta.
        assert!(block_delta(&[1; 100], &[2; 100]).is_none());
        assert!(block_delta(b"short", b"short too").is_none());
    }

    #[test]
    fn large_copies_are_split() {
        let base = vec![7u8; 0x0100_0000 + 10];
        let mut target = base.clone();
        target.push(1);
        let delta = head_tail_delta(&base, &target).unwrap();
        assert_eq!(apply_delta(&base, &delta).as_deref(), Some(&target[..]));
    }

    #[test]
    fn ids_are_gits() {
        // `git hash-object` of an empty blob and of "hello\n".
        assert_eq!(
            object_id(ObjectType::Blob, b"").to_string(),
            "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
        );
        assert_eq!(
            object_id(ObjectType::Blob, b"hello\n").to_string(),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
    }

    #[test]
    fn an_index_reads_back_with_large_offsets() {
        let entries = vec![
            (Oid::from_bytes(&[3; 20]).unwrap(), 12, 1),
            (Oid::from_bytes(&[1; 20]).unwrap(), 0x1_0000_0000, 2),
            (Oid::from_bytes(&[2; 20]).unwrap(), 500, 3),
        ];
        let idx = build_index(entries.clone(), &[9; 20]);
        let mut want = entries;
        want.sort_by_key(|e| e.0);
        assert_eq!(read_index(&idx), Some(want));
    }
}
