//! How a replica's report is laid out in Lease annotations, and read back. Pure.
//!
//! # Why
//! A report carries one count per Mesh, TrafficPolicy and PeerAuthentication, about 100 bytes
//! of JSON each, and the API server refuses a Lease whose annotations total more than 256 KiB:
//! past about 2 500 objects a plain JSON report was refused and the replica's proxies dropped
//! out of every count. Two measures, cheapest first (numbers in the README, measured by
//! `report_cost_at_cluster_scale` in `tests/propagation.rs`):
//! - **gzip + base64**, marked `gz1:` ([`GZIP_PREFIX`]): the JSON repeats its keys and kinds for
//!   every object, so it compresses about ten-fold with the names Kubernetes objects get; base64
//!   (an annotation is a string) gives back a third of that.
//! - **Shards**: names themselves do not compress away (a name may be 253 characters), so no
//!   encoding fits every mesh in one annotation. A report too large for one Lease is split over
//!   up to [`MAX_SHARDS`] Leases of the same replica; each object goes to the shard its hash
//!   picks, so an object stays in the same shard from one report to the next and a reader
//!   that sees shards written in different rounds counts it once (a position-based split
//!   would move objects between shards when one is added, and a reader could count one twice
//!   or not at all).
//!
//! A report that fits as plain JSON is written as plain JSON: readers from before this format
//! (an operator or `trellis check` mid-upgrade) keep reading small meshes, and readers read
//! both. A compact layout (objects keyed by index, generation deltas) was not chosen: gzip
//! already removes the repeated keys, and an index would need a dictionary every replica and
//! the CLI agree on.
//!
//! # Shards
//! Shard 0 lives in the replica's Lease (`trellis-propagation-<pod>`) and carries the header
//! (streams, latest view, the lagging proxies) and the shard count; shard `i` lives in
//! `trellis-propagation-<pod>.<i>` ([`shard_lease_name`]) and carries only its objects.
//! Readers ([`merge`]) take a replica's shards only when they name the same count as its shard
//! 0, whose renew time decides whether the replica counts; the publisher writes shards `1..n`
//! before shard 0, so a reader never sees a count announced before its shards exist.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};

use base64::Engine as _;
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

use super::report::{ReplicaReport, fit};
use super::track::ObjectRef;

/// The version marker of a gzip + base64 report. A report starting with `{` is plain JSON
/// (the first format); anything else is refused with [`DecodeError::UnknownFormat`] (a newer
/// operator's format, skipped by readers rather than misread).
pub const GZIP_PREFIX: &str = "gz1:";

/// Leases one replica's report may take: gzipped, one Lease holds about 12 000 objects with
/// long generated names and 45 000 with short ones (measured, README), so 32 hold ten times
/// the 25 000 the issue asks for, while bounding the replica's writes per interval (each shard
/// is rewritten only when its bytes change, or on the heartbeat) and what a reader lists.
pub const MAX_SHARDS: usize = 32;

/// Decompressed bytes a reader accepts from one annotation: a bound on what a crafted or
/// corrupt annotation can make a reader allocate (a gzip bomb). Far above a real shard.
pub const MAX_DECODED_BYTES: u64 = 64 * 1024 * 1024;

/// Why an annotation is not a report.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "unknown propagation report format (neither JSON nor `{GZIP_PREFIX}`): written by a newer operator?"
    )]
    UnknownFormat,
    #[error("propagation report is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("propagation report is not valid gzip (truncated or corrupt): {0}")]
    Gzip(std::io::Error),
    #[error("propagation report decompresses to more than {MAX_DECODED_BYTES} bytes")]
    TooLarge,
    #[error("propagation report is not a valid report: {0}")]
    Json(#[from] serde_json::Error),
}

/// Plain JSON: what readers from before [`GZIP_PREFIX`] understand.
pub fn encode_json(report: &ReplicaReport) -> String {
    serde_json::to_string(report).expect("reports serialize")
}

/// gzip + base64 behind [`GZIP_PREFIX`].
pub fn encode_gzip(report: &ReplicaReport) -> String {
    let json = serde_json::to_vec(report).expect("reports serialize");
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&json).expect("writing to a Vec");
    let bytes = gz.finish().expect("writing to a Vec");
    let mut out = String::with_capacity(GZIP_PREFIX.len() + bytes.len().div_ceil(3) * 4);
    out.push_str(GZIP_PREFIX);
    base64::engine::general_purpose::STANDARD.encode_string(&bytes, &mut out);
    out
}

/// Reads an annotation in either format.
pub fn decode(annotation: &str) -> Result<ReplicaReport, DecodeError> {
    let text = annotation.trim_start();
    if text.starts_with('{') {
        return Ok(serde_json::from_str(text)?);
    }
    let Some(b64) = text.strip_prefix(GZIP_PREFIX) else {
        return Err(DecodeError::UnknownFormat);
    };
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64.trim_end())?;
    let mut json = Vec::new();
    GzDecoder::new(bytes.as_slice())
        .take(MAX_DECODED_BYTES + 1)
        .read_to_end(&mut json)
        .map_err(DecodeError::Gzip)?;
    if json.len() as u64 > MAX_DECODED_BYTES {
        return Err(DecodeError::TooLarge);
    }
    Ok(serde_json::from_slice(&json)?)
}

/// The name of shard `index` (> 0) of `replica`'s report; shard 0 is [`super::lease_name`].
/// Pods of a Deployment have no dot in their names, so this does not collide with another
/// replica's Lease (readers join shards by the replica named inside, not by Lease name).
pub fn shard_lease_name(replica: &str, index: usize) -> String {
    format!("{}.{index}", super::lease_name(replica))
}

/// FNV-1a over the object's kind, namespace and name: stable across builds and processes
/// (the std hasher is seeded), which the shard assignment needs.
fn shard_of(object: &ObjectRef, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [&object.kind, &object.namespace, &object.name] {
        for b in part.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    (h % shards as u64) as usize
}

/// A report laid out for its Leases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The annotation of each Lease: index 0 for [`super::lease_name`], `i` for
    /// [`shard_lease_name`]`(_, i)`.
    pub annotations: Vec<String>,
    /// Lagging proxies dropped from the list to fit (they are still in `lagging_total`).
    pub shed: usize,
    /// Objects left out because the report does not fit [`MAX_SHARDS`] Leases even so:
    /// their counts miss this replica's proxies. Zero unless the mesh is past the limit the
    /// README states; the publisher warns, and the report says how many (`omitted`).
    pub omitted: usize,
}

/// Lays `report` out in at most `max_shards` annotations of at most `budget` bytes each:
/// plain JSON when it fits one, else gzip; else the objects split over 2, 4, 8, ... shards.
/// Past `max_shards` the lagging list is shed (least behind first) and, if the objects still
/// do not fit, the objects of the shards that do not fit are left out and counted in
/// `omitted` (every other shard is still written, so most counts survive). Pure.
pub fn layout(report: &ReplicaReport, budget: usize, max_shards: usize) -> Layout {
    let mut whole = report.clone();
    whole.shard = 0;
    whole.shards = 0;
    whole.omitted = 0;
    let json = encode_json(&whole);
    if json.len() <= budget {
        return Layout {
            annotations: vec![json],
            shed: 0,
            omitted: 0,
        };
    }
    let gz = encode_gzip(&whole);
    if gz.len() <= budget {
        return Layout {
            annotations: vec![gz],
            shed: 0,
            omitted: 0,
        };
    }
    // Start at the count the gzipped size asks for (with a tenth spare for uneven shards), so
    // a large report is usually encoded twice, not once per doubling.
    let mut shards = (gz.len() * 10 / 9 / budget.max(1) + 1)
        .next_power_of_two()
        .max(2);
    loop {
        let last = shards >= max_shards.max(1);
        let shards_now = if last { max_shards.max(1) } else { shards };
        let parts = split(&whole, shards_now);
        let mut head = parts[0].clone();
        let mut shed = 0;
        let mut annotations: Vec<Option<String>> = parts
            .iter()
            .map(|p| Some(encode_gzip(p)).filter(|a| a.len() <= budget))
            .collect();
        if annotations[0].is_none() {
            // The head alone too large: its lagging list gives first (a cut to fit as JSON
            // fits gzipped too).
            let listed = head.lagging.len();
            fit(&mut head, budget);
            shed = listed - head.lagging.len();
            annotations[0] = Some(encode_gzip(&head)).filter(|a| a.len() <= budget);
        }
        if annotations.iter().all(Option::is_some) {
            return Layout {
                annotations: annotations.into_iter().flatten().collect(),
                shed,
                omitted: 0,
            };
        }
        if last {
            // Past the limit: leave out the objects of the shards that do not fit, and say how
            // many in the head (which then carries none of its own if they were the cause).
            let mut omitted: usize = annotations
                .iter()
                .zip(&parts)
                .skip(1)
                .filter(|(a, _)| a.is_none())
                .map(|(_, p)| p.objects.len())
                .sum();
            if annotations[0].is_none() {
                omitted += head.objects.len();
                head.objects.clear();
            }
            head.omitted = omitted as u64;
            let empty = |i: usize| ReplicaReport {
                objects: vec![],
                ..parts[i].clone()
            };
            let out = (0..parts.len())
                .map(|i| match (i, &annotations[i]) {
                    (0, _) => encode_gzip(&head),
                    (_, Some(a)) => a.clone(),
                    (_, None) => encode_gzip(&empty(i)),
                })
                .collect();
            return Layout {
                annotations: out,
                shed,
                omitted,
            };
        }
        shards *= 2;
    }
}

/// `report` split into `shards` parts by [`shard_of`]: part 0 the header, lagging list and its
/// objects; the others their objects alone.
fn split(report: &ReplicaReport, shards: usize) -> Vec<ReplicaReport> {
    let mut parts: Vec<ReplicaReport> = (0..shards)
        .map(|i| ReplicaReport {
            replica: report.replica.clone(),
            latest: report.latest,
            shard: i as u32,
            shards: shards as u32,
            ..Default::default()
        })
        .collect();
    parts[0].streams = report.streams;
    parts[0].lagging = report.lagging.clone();
    parts[0].lagging_total = report.lagging_total;
    for c in &report.objects {
        parts[shard_of(&c.object, shards)].objects.push(c.clone());
    }
    parts
}

/// Reports read from Leases (renew time, Lease name, report) joined per replica: each shard 0
/// with the objects of the shards that name the same count; shards without their shard 0, or
/// from a different count (the layout changed between two reads), are dropped. The result
/// carries shard 0's renew time, which decides freshness for the whole report. Pure.
pub fn merge<T: Copy>(leases: Vec<(T, String, ReplicaReport)>) -> Vec<(T, String, ReplicaReport)> {
    let (heads, rest): (Vec<_>, Vec<_>) = leases.into_iter().partition(|(_, _, r)| r.shard == 0);
    let mut extra: HashMap<(String, u32), Vec<ReplicaReport>> = HashMap::new();
    for (_, _, r) in rest {
        extra
            .entry((r.replica.clone(), r.shards))
            .or_default()
            .push(r);
    }
    heads
        .into_iter()
        .map(|(at, name, mut head)| {
            if head.shards > 1
                && let Some(mut parts) = extra.remove(&(head.replica.clone(), head.shards))
            {
                parts.sort_by_key(|p| p.shard);
                parts.dedup_by_key(|p| p.shard);
                for p in parts.into_iter().filter(|p| p.shard < head.shards) {
                    head.objects.extend(p.objects);
                }
            }
            (at, name, head)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::propagation::track::ObjectCount;

    fn report(objects: usize) -> ReplicaReport {
        ReplicaReport {
            replica: "op-a".into(),
            latest: 9,
            streams: 40,
            objects: (0..objects)
                .map(|i| ObjectCount {
                    object: ObjectRef::new(
                        "TrafficPolicy",
                        &format!("team-{}", i / 10),
                        &format!("checkout-{i}"),
                    ),
                    generation: 3,
                    updated: 7,
                    total: 9,
                })
                .collect(),
            lagging: vec![],
            lagging_total: 2,
            ..Default::default()
        }
    }

    #[test]
    fn both_formats_round_trip() {
        let r = report(50);
        assert_eq!(decode(&encode_json(&r)).unwrap(), r);
        let gz = encode_gzip(&r);
        assert!(gz.starts_with(GZIP_PREFIX));
        assert_eq!(decode(&gz).unwrap(), r);
    }

    #[test]
    fn a_report_in_the_first_format_is_still_read() {
        // Written by the operator before this module (no shard fields).
        let old = r#"{"replica":"op-old","latest":4,"streams":2,"objects":[{"kind":"Mesh","name":"default","generation":2,"updated":1,"total":2}],"lagging":[],"laggingTotal":1}"#;
        let r = decode(old).unwrap();
        assert_eq!((r.replica.as_str(), r.shard, r.shards), ("op-old", 0, 0));
        assert_eq!(r.objects[0].object, ObjectRef::new("Mesh", "", "default"));
        assert_eq!(merge(vec![(1, "l".to_string(), r.clone())])[0].2, r);
    }

    #[test]
    fn a_corrupt_or_truncated_annotation_is_a_clear_error() {
        let gz = encode_gzip(&report(200));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&gz[GZIP_PREFIX.len()..])
            .unwrap();
        let cut = format!(
            "{GZIP_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(&bytes[..bytes.len() / 2])
        );
        for (bad, want) in [
            (cut.as_str(), "gzip"),
            (&gz[..gz.len() - 1], "base64"),
            ("gz1:!!!!", "base64"),
            ("gz1:", "gzip"),
            ("zz9:abcd", "unknown"),
            ("", "unknown"),
            ("{\"replica\":", "valid report"),
        ] {
            let e = decode(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad:.20}: {e}");
        }
        // Valid gzip of something else.
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(b"[1,2]").unwrap();
        let other = format!(
            "{GZIP_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(gz.finish().unwrap())
        );
        assert!(matches!(decode(&other), Err(DecodeError::Json(_))));
    }

    #[test]
    fn a_gzip_bomb_is_refused_without_inflating_it_all() {
        let mut gz = GzEncoder::new(Vec::new(), Compression::best());
        let zeros = vec![b' '; 1 << 20];
        for _ in 0..(MAX_DECODED_BYTES >> 20) + 1 {
            gz.write_all(&zeros).unwrap();
        }
        let bomb = format!(
            "{GZIP_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(gz.finish().unwrap())
        );
        assert!(bomb.len() < 256 * 1024);
        assert!(matches!(decode(&bomb), Err(DecodeError::TooLarge)));
    }

    #[test]
    fn a_small_report_stays_plain_json_a_larger_one_is_gzipped() {
        let small = report(10);
        let l = layout(&small, 250 * 1024, MAX_SHARDS);
        assert_eq!(l.annotations, vec![encode_json(&small)]);
        let big = report(5000);
        assert!(encode_json(&big).len() > 250 * 1024);
        let l = layout(&big, 250 * 1024, MAX_SHARDS);
        assert_eq!(l.annotations.len(), 1);
        assert!(l.annotations[0].starts_with(GZIP_PREFIX));
        assert_eq!(decode(&l.annotations[0]).unwrap(), big);
    }

    fn read_back(l: &Layout) -> Vec<ReplicaReport> {
        let leases = l
            .annotations
            .iter()
            .enumerate()
            .map(|(i, a)| (0, format!("lease-{i}"), decode(a).unwrap()))
            .collect();
        merge(leases).into_iter().map(|(_, _, r)| r).collect()
    }

    fn sorted(mut r: ReplicaReport) -> ReplicaReport {
        r.objects.sort_by(|a, b| a.object.cmp(&b.object));
        r
    }

    #[test]
    fn a_report_too_large_for_one_lease_is_sharded_and_read_back_whole() {
        let big = report(6000);
        let budget = 16 * 1024;
        let l = layout(&big, budget, MAX_SHARDS);
        assert!(l.annotations.len() > 1 && l.annotations.len() <= MAX_SHARDS);
        assert!(l.annotations.len().is_power_of_two());
        assert!(l.annotations.iter().all(|a| a.len() <= budget));
        assert_eq!((l.shed, l.omitted), (0, 0));
        let back = read_back(&l);
        assert_eq!(back.len(), 1);
        let mut want = big.clone();
        want.shards = l.annotations.len() as u32;
        assert_eq!(sorted(back[0].clone()), sorted(want));
    }

    #[test]
    fn an_object_keeps_its_shard_when_others_come_and_go() {
        let budget = 16 * 1024;
        let before = layout(&report(6000), budget, MAX_SHARDS);
        let mut more = report(6000);
        more.objects.remove(17);
        more.objects.push(ObjectCount {
            object: ObjectRef::new("PeerAuthentication", "new", "strict"),
            generation: 1,
            updated: 0,
            total: 1,
        });
        let after = layout(&more, budget, MAX_SHARDS);
        assert_eq!(before.annotations.len(), after.annotations.len());
        // A reader that sees shard 1 from the old round and the rest from the new one counts
        // every object of the new round (but the one removed, in the old shard) at most once.
        let mut mixed = after.clone();
        mixed.annotations[1] = before.annotations[1].clone();
        let back = &read_back(&mixed)[0];
        let mut seen = std::collections::BTreeSet::new();
        for c in &back.objects {
            assert!(seen.insert(c.object.clone()), "{} twice", c.object);
        }
        assert!(seen.len() >= 6000 - 1);
    }

    #[test]
    fn shards_of_another_count_or_without_their_head_are_ignored() {
        let big = report(6000);
        let two = layout(&big, 16 * 1024, 4);
        let mut leases: Vec<(i32, String, ReplicaReport)> = two
            .annotations
            .iter()
            .enumerate()
            .map(|(i, a)| (i as i32, format!("l{i}"), decode(a).unwrap()))
            .collect();
        assert_eq!(leases.len(), 2);
        let mut head = leases[0].2.clone();
        let own = head.objects.len();
        assert!(own < 6000);
        head.shards = 8;
        leases[0].2 = head;
        // An orphan shard of another replica.
        let mut orphan = leases[1].2.clone();
        orphan.replica = "op-gone".into();
        leases.push((9, "orphan".into(), orphan));
        let back = merge(leases);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].0, 0, "shard 0's renew time");
        assert_eq!(back[0].2.objects.len(), own, "only shard 0's objects");
    }

    #[test]
    fn past_the_last_shard_the_list_then_objects_give_and_the_report_says_how_many() {
        let mut big = report(6000);
        big.lagging = (0..100)
            .map(|i| crate::propagation::LaggingProxy {
                namespace: "shop".into(),
                pod: format!("web-{i}-{}", "p".repeat(200)),
                identity: format!("spiffe://cluster.local/ns/shop/sa/{i}"),
                acked: 1,
                latest: 2,
                stale: Default::default(),
                connected_since: None,
                behind_since: jiff::Timestamp::from_second(1_800_000_000 + i).unwrap(),
            })
            .collect();
        let budget = 8 * 1024;
        let l = layout(&big, budget, 2);
        assert_eq!(l.annotations.len(), 2);
        assert!(l.annotations.iter().all(|a| a.len() <= budget));
        assert!(l.shed > 0);
        assert!(l.omitted > 0);
        let back = &read_back(&l)[0];
        assert_eq!(back.omitted as usize, l.omitted);
        assert_eq!(back.objects.len() + l.omitted, 6000);
        assert_eq!(back.lagging_total, 2);
        assert_eq!(back.lagging[..], big.lagging[..back.lagging.len()]);
    }
}
