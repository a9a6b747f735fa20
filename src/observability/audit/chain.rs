//! The hash chain that makes an audit file tamper-evident, and its verification.
//!
//! Each line is `B + ,"hash":"H"}` where `B` is the record's JSON up to and including its
//! `"prev":"P"` member, `P` is the previous line's `H` (64 zeros at the very start), and
//! `H = hex(SHA-256(B))`. The hashed bytes are the bytes on disk, so there is no canonical-JSON
//! step to get wrong: any edit to a line changes its hash, and deleting or reordering lines breaks
//! the `prev` links.
//!
//! Every record also names its `replica` and its `chain` (written by the writer, just before
//! `prev`): replicas of one gateway each keep their own chain, and a log collector interleaves
//! them; verification follows each chain by its id. A chain id is random per writer, and kept
//! when a restarted writer continues the chain of an existing file.

use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, Read, Seek, SeekFrom};
use std::path::Path;

use sha2::{Digest, Sha256};

/// The `prev` of the first record ever written.
pub const GENESIS: ChainHash = ChainHash([0; 32]);

const HASH_MEMBER: &[u8] = b",\"hash\":\"";

/// A SHA-256 chain value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ChainHash(pub [u8; 32]);

impl ChainHash {
    /// Parses 64 lowercase hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        (text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| hex::decode_to_slice(text, &mut out).ok())
            .flatten()
            .map(|()| Self(out))
    }

    /// Lowercase hex.
    pub fn to_hex(self) -> String {
        String::from_utf8_lossy(&self.hex_bytes()).into_owned()
    }

    /// Lowercase hex, without allocating (this runs once per audit record).
    pub fn hex_bytes(self) -> [u8; 64] {
        let mut out = [0u8; 64];
        const_hex::encode_to_slice(self.0, &mut out).expect("64 bytes hold 32 in hex");
        out
    }
}

impl fmt::Display for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHash({self})")
    }
}

/// Which chain a writer appends to: its replica and chain id, as the JSON members every record
/// carries (`,"replica":"gw-0","chain":"…"`), rendered once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainTag {
    members: Vec<u8>,
    chain: String,
}

impl ChainTag {
    /// The tag of `chain` written by `replica`.
    pub fn new(replica: &str, chain: &str) -> Self {
        let text = |s: &str| serde_json::to_string(s).expect("a string serializes");
        let members = format!(",\"replica\":{},\"chain\":{}", text(replica), text(chain));
        Self {
            members: members.into_bytes(),
            chain: chain.to_string(),
        }
    }

    /// A new chain: 16 random hex digits.
    pub fn new_chain_id() -> String {
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).expect("the operating system's random source is unavailable");
        hex::encode(id)
    }

    /// The chain id.
    pub fn chain(&self) -> &str {
        &self.chain
    }
}

/// Appends the chain members to a record and returns the new chain head.
///
/// `open` is the record's JSON object without its closing brace (`{"ts":...,"error":null`).
/// The finished line, newline included, is appended to `out`.
pub fn seal(open: &[u8], tag: &ChainTag, prev: ChainHash, out: &mut Vec<u8>) -> ChainHash {
    let start = out.len();
    out.extend_from_slice(open);
    out.extend_from_slice(&tag.members);
    out.extend_from_slice(b",\"prev\":\"");
    out.extend_from_slice(&prev.hex_bytes());
    out.push(b'"');
    let hash = ChainHash(Sha256::digest(&out[start..]).into());
    out.extend_from_slice(HASH_MEMBER);
    out.extend_from_slice(&hash.hex_bytes());
    out.extend_from_slice(b"\"}\n");
    hash
}

/// Why a line does not continue the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broken {
    /// The line is not a JSON object ending in a `hash` member.
    Malformed(String),
    /// The line's `prev` is not the previous line's `hash`: a line before it was deleted, or
    /// lines were reordered.
    Link {
        /// What the previous line's hash says `prev` must be.
        expected: ChainHash,
        /// What the line says.
        found: String,
    },
    /// The line's `hash` does not match its bytes: the line was edited.
    Hash,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(why) => write!(f, "not an audit record: {why}"),
            Self::Link { expected, found } => write!(
                f,
                "prev is {found} but the previous record's hash is {expected} \
                 (a record before this one was deleted, or records were reordered)"
            ),
            Self::Hash => f.write_str("hash does not match the record (the record was edited)"),
        }
    }
}

/// Checks one line. `expected_prev` is `None` for the first line of a verification, whose `prev`
/// is taken as given (the chain may continue from an earlier, rotated file).
/// Returns the line's hash, which the next line must name as its `prev`.
pub fn check_line(line: &[u8], expected_prev: Option<ChainHash>) -> Result<ChainHash, Broken> {
    let value: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| Broken::Malformed(format!("invalid JSON ({e})")))?;
    let field = |name: &str| {
        value
            .get(name)
            .and_then(|v| v.as_str())
            .ok_or_else(|| Broken::Malformed(format!("no \"{name}\" string member")))
    };
    let (prev_text, hash_text) = (field("prev")?, field("hash")?);
    let hash = ChainHash::parse(hash_text)
        .ok_or_else(|| Broken::Malformed("hash is not 64 hex digits".into()))?;
    let prev = ChainHash::parse(prev_text)
        .ok_or_else(|| Broken::Malformed("prev is not 64 hex digits".into()))?;
    // The hashed prefix ends where the hash member begins; it must be the line's last member.
    let suffix_len = HASH_MEMBER.len() + 64 + 2;
    let body_end = line.len().checked_sub(suffix_len);
    let body = match body_end {
        Some(end) if line[end..].starts_with(HASH_MEMBER) && line.ends_with(b"\"}") => &line[..end],
        _ => return Err(Broken::Malformed("\"hash\" is not the last member".into())),
    };
    if !body.ends_with(format!(",\"prev\":\"{prev}\"").as_bytes()) {
        return Err(Broken::Malformed(
            "\"prev\" does not come right before \"hash\"".into(),
        ));
    }
    if let Some(expected) = expected_prev
        && expected != prev
    {
        return Err(Broken::Link {
            expected,
            found: prev_text.to_string(),
        });
    }
    if ChainHash(Sha256::digest(body).into()) != hash {
        return Err(Broken::Hash);
    }
    Ok(hash)
}

/// One chain found by a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedChain {
    /// Its id (`""` for records written before chains had ids).
    pub id: String,
    /// The replica that wrote it, as its first record says.
    pub replica: Option<String>,
    /// Records checked.
    pub records: u64,
    /// The `prev` of its first record (all zeros when the chain starts there).
    pub anchor: ChainHash,
    /// Its last record's hash.
    pub head: ChainHash,
}

/// The result of verifying one or more files in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Records checked, in all chains.
    pub records: u64,
    /// The chains, in the order their first records appear.
    pub chains: Vec<VerifiedChain>,
    /// Lines that are not JSON at all (file, 1-based line): what a crash in the middle of a
    /// write leaves. Skipped only where a crash can leave one: at the end of a file, or before
    /// a record that continues a chain already seen (its link checked) or starts a new one
    /// from the beginning, as a gateway restarted on a file with no whole record does.
    pub torn: Vec<(String, u64)>,
    /// The anchors asked for (heads logged at shutdown or rotation, kept elsewhere) that no
    /// record in the files has as its hash, nor any chain continues from: records up to them
    /// were removed or replaced.
    pub missing_anchors: Vec<ChainHash>,
    /// With anchors: the chains that continue from a record not in the files (their first
    /// `prev` is neither all zeros nor an anchor): the records before them were removed, or
    /// their earlier files were not given.
    pub unanchored: Vec<String>,
}

/// The first broken line found.
#[derive(Debug)]
pub struct VerifyError {
    /// File name, as given.
    pub file: String,
    /// 1-based line number, or 0 when the file could not be read at all.
    pub line: u64,
    /// What is wrong.
    pub problem: String,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.problem)
        } else {
            write!(f, "{} line {}: {}", self.file, self.line, self.problem)
        }
    }
}

/// Verifies files in the order given (oldest rotated file first): each chain (by its `chain`
/// member) must be unbroken, however the chains' records are interleaved, as a log collector
/// merging several replicas' output interleaves them.
pub fn verify_files(files: &[impl AsRef<Path>]) -> Result<Verified, VerifyError> {
    verify_anchored(files, &[])
}

/// [`verify_files`], and each of `anchors` must be the hash of a record in the files, or the
/// head a chain in them continues from: a chain cut short, or rewritten whole from some point
/// on, no longer holds a head recorded before. With anchors, a chain must also start from the
/// beginning or from one of them, so that records removed before an anchor are found too.
pub fn verify_anchored(
    files: &[impl AsRef<Path>],
    anchors: &[ChainHash],
) -> Result<Verified, VerifyError> {
    let mut verified = Verified {
        records: 0,
        chains: Vec::new(),
        torn: Vec::new(),
        missing_anchors: anchors.to_vec(),
        unanchored: Vec::new(),
    };
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for file in files {
        let path = file.as_ref();
        let name = path.display().to_string();
        let reader = std::fs::File::open(path).map(std::io::BufReader::new);
        let reader = reader.map_err(|e| VerifyError {
            file: name.clone(),
            line: 0,
            problem: e.to_string(),
        })?;
        // A line that is not a record, not yet known to be what a crash leaves.
        let mut torn = None;
        for (index, line) in reader.split(b'\n').enumerate() {
            let line_no = index as u64 + 1;
            let broken = |problem: String| VerifyError {
                file: name.clone(),
                line: line_no,
                problem,
            };
            let line = line.map_err(|e| broken(e.to_string()))?;
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(&line) else {
                torn.get_or_insert(line_no);
                verified.torn.push((name.clone(), line_no));
                continue;
            };
            let member = |key: &str| value.get(key)?.as_str().map(String::from);
            let id = member("chain").unwrap_or_default();
            let chain = by_id.get(&id).map(|i| &verified.chains[*i]);
            let hash = check_line(&line, chain.map(|c| c.head))
                .map_err(|b| broken(format!("{b} (chain {id:?})")))?;
            if let Some(at) = torn.take()
                && chain.is_none()
                && member("prev").as_deref().and_then(ChainHash::parse) != Some(GENESIS)
            {
                // No crash leaves this: a record replaced by something else, where the next
                // record would have named it.
                return Err(VerifyError {
                    file: name.clone(),
                    line: at,
                    problem: format!(
                        "not an audit record, and the record after it (line {line_no}) neither \
                         continues a chain seen before nor starts one"
                    ),
                });
            }
            verified.missing_anchors.retain(|a| *a != hash);
            match by_id.get(&id) {
                Some(i) => {
                    let chain = &mut verified.chains[*i];
                    chain.head = hash;
                    chain.records += 1;
                }
                None => {
                    let anchor = member("prev")
                        .as_deref()
                        .and_then(ChainHash::parse)
                        .unwrap_or(GENESIS);
                    by_id.insert(id.clone(), verified.chains.len());
                    verified.chains.push(VerifiedChain {
                        id,
                        replica: member("replica"),
                        records: 1,
                        anchor,
                        head: hash,
                    });
                }
            }
            verified.records += 1;
        }
    }
    if !anchors.is_empty() {
        for chain in &verified.chains {
            verified.missing_anchors.retain(|a| *a != chain.anchor);
        }
        verified.unanchored = verified
            .chains
            .iter()
            .filter(|c| c.anchor != GENESIS && !anchors.contains(&c.anchor))
            .map(|c| c.id.clone())
            .collect();
    }
    Ok(verified)
}

/// Where an existing audit file's chain ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The last complete record's hash.
    pub hash: ChainHash,
    /// Its chain id (`None` for a record written before chains had ids).
    pub chain: Option<String>,
}

/// The hash of the last complete record in an existing audit file, so that a restarted gateway
/// continues the chain. `Ok(None)` for a missing or empty file. A torn last line (a crash in the
/// middle of a write) is skipped with a warning; the chain continues from the last good record and
/// `audit verify` reports the torn line.
pub fn read_head(path: &Path) -> std::io::Result<Option<Head>> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // A device or a pipe has no records to continue from (and /dev/full reads forever).
    if !file.metadata()?.is_file() {
        return Ok(None);
    }
    let len = file.seek(SeekFrom::End(0))?;
    // Records are small; a tail of 1 MiB holds many of them.
    let start = len.saturating_sub(1024 * 1024);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    for (n, line) in tail.rsplit(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        if let Ok(hash) = check_line(line, None) {
            let chain = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("chain")?.as_str().map(String::from));
            return Ok(Some(Head { hash, chain }));
        }
        if n <= 1 {
            tracing::warn!(
                file = %path.display(),
                "the last line of the audit file is not a complete record; continuing the chain \
                 from the last complete one"
            );
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(records: &[&str]) -> Vec<Vec<u8>> {
        let mut prev = GENESIS;
        records
            .iter()
            .map(|r| {
                let mut line = Vec::new();
                prev = seal(r.as_bytes(), &ChainTag::new("gw-0", "c0"), prev, &mut line);
                line.pop();
                line
            })
            .collect()
    }

    fn check_all(lines: &[Vec<u8>]) -> Result<(), (usize, Broken)> {
        let mut prev = Some(GENESIS);
        for (i, line) in lines.iter().enumerate() {
            prev = Some(check_line(line, prev).map_err(|b| (i + 1, b))?);
        }
        Ok(())
    }

    #[test]
    fn sealed_lines_are_json_and_verify() {
        let lines = chain(&[r#"{"a":1"#, r#"{"b":"x"}"#.trim_end_matches('}')]);
        for line in &lines {
            let v: serde_json::Value = serde_json::from_slice(line).unwrap();
            assert!(v["hash"].as_str().unwrap().len() == 64);
        }
        check_all(&lines).unwrap();
    }

    #[test]
    fn edit_delete_and_reorder_are_caught_at_the_right_line() {
        let lines = chain(&[r#"{"n":1"#, r#"{"n":2"#, r#"{"n":3"#]);

        let mut edited = lines.clone();
        edited[1] = String::from_utf8(edited[1].clone())
            .unwrap()
            .replace("\"n\":2", "\"n\":7")
            .into_bytes();
        assert_eq!(check_all(&edited).unwrap_err(), (2, Broken::Hash));

        let deleted = vec![lines[0].clone(), lines[2].clone()];
        assert!(matches!(
            check_all(&deleted).unwrap_err(),
            (2, Broken::Link { .. })
        ));

        let reordered = vec![lines[1].clone(), lines[0].clone(), lines[2].clone()];
        assert!(matches!(
            check_all(&reordered).unwrap_err(),
            (1, Broken::Link { .. })
        ));
    }

    #[test]
    fn hash_must_be_last_and_prev_adjacent() {
        let line = br#"{"hash":"00","prev":"00"}"#;
        assert!(matches!(check_line(line, None), Err(Broken::Malformed(_))));
        assert!(matches!(
            check_line(b"not json", None),
            Err(Broken::Malformed(_))
        ));
    }

    #[test]
    fn head_skips_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let lines = chain(&[r#"{"n":1"#, r#"{"n":2"#]);
        let mut text = lines.join(&b'\n');
        text.extend_from_slice(b"\n{\"n\":3,\"pr");
        std::fs::write(&path, &text).unwrap();
        let expected = check_line(&lines[1], None).unwrap();
        assert_eq!(read_head(&path).unwrap().map(|h| h.hash), Some(expected));
        assert_eq!(read_head(&dir.path().join("missing")).unwrap(), None);
    }

    #[test]
    fn a_torn_line_is_skipped_and_the_chain_is_checked_across_it() {
        let dir = tempfile::tempdir().unwrap();
        let lines = chain(&[r#"{"n":1"#, r#"{"n":2"#, r#"{"n":3"#]);
        let write = |name: &str, lines: &[&[u8]]| {
            let path = dir.path().join(name);
            std::fs::write(&path, [lines.join(&b'\n'), b"\n".to_vec()].concat()).unwrap();
            path
        };
        // A crash cut a record off after line 1; the writer went on from line 1's hash.
        let torn: &[u8] = br#"{"n":9,"replica":"r","pr"#;
        let path = write("torn", &[&lines[0], torn, &lines[1], &lines[2]]);
        let v = verify_files(&[&path]).expect("intact apart from the torn line");
        assert_eq!(v.records, 3);
        assert_eq!(v.torn, [(path.display().to_string(), 2)]);
        // A torn-looking line hides nothing: an edit after it is still found...
        let edited = String::from_utf8(lines[2].clone())
            .unwrap()
            .replace("\"n\":3", "\"n\":4");
        let path = write("edited", &[&lines[0], torn, &lines[1], edited.as_bytes()]);
        assert_eq!(verify_files(&[&path]).unwrap_err().line, 4);
        // ...and so is a record replaced by one, in the middle of a chain or at its start.
        let path = write("replaced", &[&lines[0], torn, &lines[2]]);
        assert_eq!(verify_files(&[&path]).unwrap_err().line, 3);
        let path = write("first replaced", &[torn, &lines[1], &lines[2]]);
        assert_eq!(verify_files(&[&path]).unwrap_err().line, 1);
        // A crash in a file's first write: the restarted gateway starts a chain from the
        // beginning after it. And one in the last write, with nothing after it.
        let path = write("first torn", &[torn, &lines[0], &lines[1]]);
        assert_eq!(verify_files(&[&path]).unwrap().torn.len(), 1);
        let path = write("last torn", &[&lines[0], &lines[1], torn]);
        assert_eq!(verify_files(&[&path]).unwrap().torn.len(), 1);
    }

    #[test]
    fn anchors_find_a_chain_cut_short_or_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let lines = chain(&[r#"{"n":1"#, r#"{"n":2"#, r#"{"n":3"#]);
        let heads: Vec<ChainHash> = lines.iter().map(|l| check_line(l, None).unwrap()).collect();
        let path = dir.path().join("audit");
        std::fs::write(&path, [lines[..2].join(&b'\n'), b"\n".to_vec()].concat()).unwrap();
        // The head logged after record 2 is there; the one logged after record 3 is not.
        let v = verify_anchored(&[&path], &[heads[1]]).unwrap();
        assert!(v.missing_anchors.is_empty());
        let v = verify_anchored(&[&path], &[heads[1], heads[2]]).unwrap();
        assert_eq!(v.missing_anchors, [heads[2]]);
        // A chain rewritten from its start: intact, and none of the heads logged before.
        let forged = chain(&[r#"{"n":1"#, r#"{"n":5"#]);
        std::fs::write(&path, [forged.join(&b'\n'), b"\n".to_vec()].concat()).unwrap();
        let v = verify_anchored(&[&path], &[heads[1]]).unwrap();
        assert_eq!(v.missing_anchors, [heads[1]]);
        // Records removed before the anchor: the chain continues from a record nobody names.
        std::fs::write(&path, [lines[1..].join(&b'\n'), b"\n".to_vec()].concat()).unwrap();
        let v = verify_anchored(&[&path], &[heads[2]]).unwrap();
        assert!(v.missing_anchors.is_empty());
        assert_eq!(v.unanchored, ["c0"]);
        // A file after a rotation, anchored by the head logged at the rotation: whole.
        let v = verify_anchored(&[&path], &[heads[0]]).unwrap();
        assert!(v.missing_anchors.is_empty() && v.unanchored.is_empty());
    }

    /// A chain of `n` records by `replica` under chain id `id`.
    fn tagged(replica: &str, id: &str, n: usize) -> Vec<Vec<u8>> {
        let tag = ChainTag::new(replica, id);
        let mut prev = GENESIS;
        (0..n)
            .map(|i| {
                let mut line = Vec::new();
                prev = seal(format!("{{\"n\":{i}").as_bytes(), &tag, prev, &mut line);
                line.pop();
                line
            })
            .collect()
    }

    #[test]
    fn interleaved_chains_verify_each_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("merged.log");
        let (a, b) = (tagged("gw-0", "aaaa", 3), tagged("gw-1", "bbbb", 2));
        // As a log collector merges two replicas' output.
        let merged = [&a[0], &b[0], &a[1], &b[1], &a[2]];
        let text: Vec<u8> = merged
            .iter()
            .flat_map(|l| [&l[..], b"\n"].concat())
            .collect();
        std::fs::write(&path, &text).unwrap();
        let v = verify_files(&[&path]).unwrap();
        assert_eq!(v.records, 5);
        let summary: Vec<_> = v
            .chains
            .iter()
            .map(|c| (c.id.as_str(), c.replica.as_deref(), c.records, c.anchor))
            .collect();
        assert_eq!(
            summary,
            [
                ("aaaa", Some("gw-0"), 3, GENESIS),
                ("bbbb", Some("gw-1"), 2, GENESIS)
            ]
        );
        // Reordering within one chain, or dropping one of its records, is still caught.
        for broken in [
            vec![&a[0], &b[0], &a[2], &b[1], &a[1]],
            vec![&a[0], &b[0], &b[1], &a[2]],
        ] {
            let text: Vec<u8> = broken
                .iter()
                .flat_map(|l| [&l[..], b"\n"].concat())
                .collect();
            std::fs::write(&path, &text).unwrap();
            let e = verify_files(&[&path]).unwrap_err();
            assert!(e.problem.contains("\"aaaa\""), "{e}");
        }
        // A record cannot move to another chain: its id is hashed with it.
        let moved = String::from_utf8(a[1].clone())
            .unwrap()
            .replace("aaaa", "bbbb");
        let text = [&a[0][..], b"\n", &b[0], b"\n", moved.as_bytes(), b"\n"].concat();
        std::fs::write(&path, &text).unwrap();
        assert!(verify_files(&[&path]).is_err());
    }
}
