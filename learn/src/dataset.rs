//! Reader for the generic dataset format (`data/<name>/`), the first stage of the data path:
//! files on disk → [`Dataset`] → [`crate::window`] → [`crate::split`].
//!
//! Layout (see `docs/ARCHITECTURE.md`):
//! - `dataset.json`: name, sample rate, channels (name, unit), classes, license, source.
//! - `recordings.csv`: header with the columns `recording,subject,session,file` (any order;
//!   further columns are ignored); `file` is a path relative to `recordings/`, `.csv` is
//!   appended when it has no extension.
//! - `recordings/<file>`: header = the channel names in dataset order, then `label`; one
//!   row per sample; `label` is a class name or empty (unlabelled).
//!
//! CSV here is the plain kind: fields are separated by `,` and trimmed, quoting is not
//! supported, blank lines are skipped, `\r\n` line ends are accepted. Recordings of a
//! session are assumed to be listed in `recordings.csv` in time order.
//!
//! Every error names the file, the 1-based line number in that file, the column and what
//! was expected versus found.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Component, Path, PathBuf};

/// Name of the label column in recording files.
pub const LABEL_COLUMN: &str = "label";
/// Columns `recordings.csv` must have.
pub const INDEX_COLUMNS: [&str; 4] = ["recording", "subject", "session", "file"];

/// One sensor channel of a dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChannelInfo {
    pub name: String,
    #[serde(default)]
    pub unit: String,
}

/// Contents of `dataset.json`. `license` and `source` may be absent (empty).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetMeta {
    pub name: String,
    pub sample_rate_hz: f64,
    pub channels: Vec<ChannelInfo>,
    pub classes: Vec<String>,
    #[serde(default)]
    pub license: String,
    #[serde(default)]
    pub source: String,
}

impl DatasetMeta {
    /// Every problem with the description, empty if it is usable.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.name.trim().is_empty() {
            problems.push("\"name\" must not be empty".to_string());
        }
        if !(self.sample_rate_hz.is_finite() && self.sample_rate_hz > 0.0) {
            problems.push(format!(
                "\"sample_rate_hz\" must be a positive number, found {}",
                self.sample_rate_hz
            ));
        }
        if self.channels.is_empty() {
            problems.push("\"channels\" must list at least one channel".to_string());
        }
        let mut seen = HashSet::new();
        for ch in &self.channels {
            if ch.name.trim().is_empty() || ch.name.contains(',') || ch.name != ch.name.trim() {
                problems.push(format!(
                    "channel name {:?} must be non-empty, without ',' or surrounding spaces",
                    ch.name
                ));
            } else if ch.name == LABEL_COLUMN {
                problems.push(format!("channel name \"{LABEL_COLUMN}\" is reserved"));
            } else if !seen.insert(ch.name.as_str()) {
                problems.push(format!("channel {:?} is listed twice", ch.name));
            }
        }
        if self.classes.len() > usize::from(u16::MAX) {
            problems.push(format!(
                "at most {} classes are supported, found {}",
                u16::MAX,
                self.classes.len()
            ));
        }
        let mut seen = HashSet::new();
        for class in &self.classes {
            if class.trim().is_empty() || class.contains(',') || class != class.trim() {
                problems.push(format!(
                    "class name {class:?} must be non-empty, without ',' or surrounding spaces"
                ));
            } else if !seen.insert(class.as_str()) {
                problems.push(format!("class {class:?} is listed twice"));
            }
        }
        problems
    }

    /// Index of a class name in `classes`.
    pub fn class_index(&self, name: &str) -> Option<u16> {
        self.classes
            .iter()
            .position(|c| c == name)
            .and_then(|i| u16::try_from(i).ok())
    }

    pub fn channel_names(&self) -> Vec<String> {
        self.channels.iter().map(|c| c.name.clone()).collect()
    }
}

/// One continuous recording of one subject in one session.
#[derive(Clone, Debug, PartialEq)]
pub struct Recording {
    pub id: String,
    pub subject: String,
    pub session: String,
    /// The `file` value of `recordings.csv`.
    pub file: String,
    /// Number of channels, equal to the dataset's.
    pub channels: usize,
    /// Row-major samples, `rows() × channels`.
    pub samples: Vec<f32>,
    /// One label per row, an index into `DatasetMeta::classes`.
    pub labels: Vec<Option<u16>>,
}

impl Recording {
    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// The `channels` values of row `i`. Panics if `i >= rows()`, like slice indexing.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.samples[i * self.channels..(i + 1) * self.channels]
    }

    /// Rows `start..start + len`, row-major. Panics if out of range, like slice indexing.
    pub fn rows_slice(&self, start: usize, len: usize) -> &[f32] {
        &self.samples[start * self.channels..(start + len) * self.channels]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: file not found (referenced by {} line {line})", .path.display(), .index.display())]
    MissingFile {
        path: PathBuf,
        index: PathBuf,
        line: usize,
    },
    #[error("{}: bad dataset description: {problem}", .path.display())]
    BadMeta { path: PathBuf, problem: String },
    #[error("{}: empty file, expected a header line {expected}", .path.display())]
    NoHeader { path: PathBuf, expected: String },
    #[error("{}, line {line}: missing column '{column}' (expected header {expected})", .path.display())]
    MissingColumn {
        path: PathBuf,
        line: usize,
        column: String,
        expected: String,
    },
    #[error("{}, line {line}: unexpected column '{column}' (expected header {expected})", .path.display())]
    UnexpectedColumn {
        path: PathBuf,
        line: usize,
        column: String,
        expected: String,
    },
    #[error("{}, line {line}: column '{column}' appears twice", .path.display())]
    DuplicateColumn {
        path: PathBuf,
        line: usize,
        column: String,
    },
    #[error("{}, line {line}: columns out of order, expected {expected}, found {found}", .path.display())]
    ColumnOrder {
        path: PathBuf,
        line: usize,
        expected: String,
        found: String,
    },
    #[error("{}, line {line}: missing value for column '{column}' (expected {expected} values, found {found})", .path.display())]
    MissingValue {
        path: PathBuf,
        line: usize,
        column: String,
        expected: usize,
        found: usize,
    },
    #[error("{}, line {line}: too many values, expected {expected}, found {found}", .path.display())]
    ExtraValues {
        path: PathBuf,
        line: usize,
        expected: usize,
        found: usize,
    },
    #[error("{}, line {line}, column '{column}': expected a number, found '{value}'", .path.display())]
    NotNumeric {
        path: PathBuf,
        line: usize,
        column: String,
        value: String,
    },
    #[error("{}, line {line}, column '{column}': expected a finite number, found '{value}'", .path.display())]
    NotFinite {
        path: PathBuf,
        line: usize,
        column: String,
        value: String,
    },
    #[error("{}, line {line}, column '{column}': unknown class '{value}', expected one of {known} or empty", .path.display())]
    UnknownClass {
        path: PathBuf,
        line: usize,
        column: String,
        value: String,
        known: String,
    },
    #[error("{}, line {line}, column '{column}': expected a value, found an empty field", .path.display())]
    EmptyValue {
        path: PathBuf,
        line: usize,
        column: String,
    },
    #[error("{}, line {line}, column 'file': expected a relative path inside recordings/, found '{file}'", .path.display())]
    BadFilePath {
        path: PathBuf,
        line: usize,
        file: String,
    },
    #[error("{}, line {line}: duplicate recording id '{id}' (first on line {first_line})", .path.display())]
    DuplicateRecording {
        path: PathBuf,
        line: usize,
        id: String,
        first_line: usize,
    },
    #[error("{}: lists no recordings, expected at least one", .path.display())]
    NoRecordings { path: PathBuf },
    #[error("recording '{recording}': {problem}")]
    Inconsistent { recording: String, problem: String },
}

/// A whole dataset in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub meta: DatasetMeta,
    pub recordings: Vec<Recording>,
}

impl Dataset {
    /// Reads a dataset directory in the generic format.
    pub fn load(dir: &Path) -> Result<Dataset, DatasetError> {
        let started = std::time::Instant::now();
        let meta_path = dir.join("dataset.json");
        let meta_text = read_text(&meta_path)?;
        let meta: DatasetMeta =
            serde_json::from_str(&meta_text).map_err(|e| DatasetError::BadMeta {
                path: meta_path.clone(),
                problem: e.to_string(),
            })?;
        let problems = meta.problems();
        if !problems.is_empty() {
            return Err(DatasetError::BadMeta {
                path: meta_path,
                problem: problems.join("; "),
            });
        }

        let index = read_index(&dir.join("recordings.csv"))?;
        let classes: HashMap<&str, u16> = meta
            .classes
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((c.as_str(), u16::try_from(i).ok()?)))
            .collect();
        let mut recordings = Vec::with_capacity(index.len());
        for entry in index {
            let (samples, labels) = read_recording(&entry.path, &meta, &classes)?;
            if labels.is_empty() {
                tracing::warn!(recording = %entry.id, file = %entry.path.display(), "Recording has no samples.");
            }
            recordings.push(Recording {
                id: entry.id,
                subject: entry.subject,
                session: entry.session,
                file: entry.file,
                channels: meta.channels.len(),
                samples,
                labels,
            });
        }
        let dataset = Dataset { meta, recordings };
        tracing::debug!(
            dataset = %dataset.meta.name,
            recordings = dataset.recordings.len(),
            rows = dataset.rows(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Loaded dataset."
        );
        Ok(dataset)
    }

    /// Builds a dataset from parts (e.g. synthetic data), checking the invariants `load`
    /// guarantees.
    pub fn from_parts(
        meta: DatasetMeta,
        recordings: Vec<Recording>,
    ) -> Result<Dataset, DatasetError> {
        let dataset = Dataset { meta, recordings };
        dataset.validate()?;
        Ok(dataset)
    }

    /// Checks the invariants every consumer relies on: a valid description, unique
    /// recording ids, consistent sample/label lengths, finite values and label indices in
    /// range.
    pub fn validate(&self) -> Result<(), DatasetError> {
        let problems = self.meta.problems();
        if !problems.is_empty() {
            return Err(DatasetError::BadMeta {
                path: PathBuf::from("dataset.json"),
                problem: problems.join("; "),
            });
        }
        let c = self.meta.channels.len();
        let k = self.meta.classes.len();
        let mut ids = HashSet::new();
        for rec in &self.recordings {
            let bad = |problem: String| DatasetError::Inconsistent {
                recording: rec.id.clone(),
                problem,
            };
            if !ids.insert(rec.id.as_str()) {
                return Err(bad("duplicate recording id".to_string()));
            }
            if rec.channels != c {
                return Err(bad(format!(
                    "expected {c} channels, found {}",
                    rec.channels
                )));
            }
            if rec.samples.len() != rec.labels.len() * c {
                return Err(bad(format!(
                    "expected {} samples ({} rows × {c} channels), found {}",
                    rec.labels.len() * c,
                    rec.labels.len(),
                    rec.samples.len()
                )));
            }
            if let Some(i) = rec.samples.iter().position(|v| !v.is_finite()) {
                return Err(bad(format!(
                    "row {}, channel {}: expected a finite number, found {}",
                    i / c,
                    i % c,
                    rec.samples[i]
                )));
            }
            if let Some((row, l)) = rec
                .labels
                .iter()
                .enumerate()
                .find_map(|(r, l)| l.filter(|&l| usize::from(l) >= k).map(|l| (r, l)))
            {
                return Err(bad(format!(
                    "row {row}: label index {l} out of range, the dataset has {k} classes"
                )));
            }
        }
        Ok(())
    }

    /// Total number of rows over all recordings.
    pub fn rows(&self) -> usize {
        self.recordings.iter().map(Recording::rows).sum()
    }

    /// Distinct subjects in order of first appearance.
    pub fn subjects(&self) -> Vec<&str> {
        distinct(self.recordings.iter().map(|r| r.subject.as_str()))
    }

    /// Distinct sessions in order of first appearance.
    pub fn sessions(&self) -> Vec<&str> {
        distinct(self.recordings.iter().map(|r| r.session.as_str()))
    }

    /// Row counts per subject/session and per class, for `inspect`.
    pub fn summary(&self) -> DatasetSummary {
        let k = self.meta.classes.len();
        let mut sessions: Vec<SessionSummary> = Vec::new();
        let mut position: HashMap<(&str, &str), usize> = HashMap::new();
        let mut class_rows = vec![0usize; k];
        let mut unlabelled_rows = 0;
        for rec in &self.recordings {
            let key = (rec.subject.as_str(), rec.session.as_str());
            let idx = *position.entry(key).or_insert_with(|| {
                sessions.push(SessionSummary {
                    subject: rec.subject.clone(),
                    session: rec.session.clone(),
                    recordings: 0,
                    rows: 0,
                    class_rows: vec![0; k],
                    unlabelled_rows: 0,
                });
                sessions.len() - 1
            });
            let s = &mut sessions[idx];
            s.recordings += 1;
            s.rows += rec.rows();
            for label in &rec.labels {
                match label {
                    Some(c) => {
                        s.class_rows[usize::from(*c)] += 1;
                        class_rows[usize::from(*c)] += 1;
                    }
                    None => {
                        s.unlabelled_rows += 1;
                        unlabelled_rows += 1;
                    }
                }
            }
        }
        DatasetSummary {
            name: self.meta.name.clone(),
            sample_rate_hz: self.meta.sample_rate_hz,
            channels: self.meta.channel_names(),
            classes: self.meta.classes.clone(),
            recordings: self.recordings.len(),
            rows: self.rows(),
            sessions,
            class_rows,
            unlabelled_rows,
        }
    }
}

/// Rows of one subject in one session.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SessionSummary {
    pub subject: String,
    pub session: String,
    pub recordings: usize,
    pub rows: usize,
    /// Rows per class, in dataset class order.
    pub class_rows: Vec<usize>,
    pub unlabelled_rows: usize,
}

/// What `inspect` prints about a dataset.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DatasetSummary {
    pub name: String,
    pub sample_rate_hz: f64,
    pub channels: Vec<String>,
    pub classes: Vec<String>,
    pub recordings: usize,
    pub rows: usize,
    /// Per subject/session, in order of first appearance.
    pub sessions: Vec<SessionSummary>,
    /// Rows per class, in dataset class order.
    pub class_rows: Vec<usize>,
    pub unlabelled_rows: usize,
}

impl fmt::Display for DatasetSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "dataset {}: {} Hz, channels [{}], {} recordings, {} rows ({:.1} min)",
            self.name,
            self.sample_rate_hz,
            self.channels.join(", "),
            self.recordings,
            self.rows,
            self.rows as f64 / self.sample_rate_hz / 60.0
        )?;
        write!(
            f,
            "{:>10} {:>8} {:>5} {:>9}",
            "subject", "session", "recs", "rows"
        )?;
        for class in &self.classes {
            write!(f, " {:>10}", class)?;
        }
        writeln!(f, " {:>10}", "(none)")?;
        for s in &self.sessions {
            write!(
                f,
                "{:>10} {:>8} {:>5} {:>9}",
                s.subject, s.session, s.recordings, s.rows
            )?;
            for n in &s.class_rows {
                write!(f, " {n:>10}")?;
            }
            writeln!(f, " {:>10}", s.unlabelled_rows)?;
        }
        write!(
            f,
            "{:>10} {:>8} {:>5} {:>9}",
            "total", "", self.recordings, self.rows
        )?;
        for n in &self.class_rows {
            write!(f, " {n:>10}")?;
        }
        writeln!(f, " {:>10}", self.unlabelled_rows)
    }
}

fn distinct<'a>(items: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = HashSet::new();
    items.filter(|s| seen.insert(*s)).collect()
}

fn read_text(path: &Path) -> Result<String, DatasetError> {
    std::fs::read_to_string(path).map_err(|source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    })
}

struct IndexEntry {
    id: String,
    subject: String,
    session: String,
    file: String,
    path: PathBuf,
}

/// Non-blank lines with their 1-based line numbers; a leading byte-order mark is dropped.
fn numbered_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.strip_prefix('\u{feff}')
        .unwrap_or(text)
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty())
}

fn read_index(path: &Path) -> Result<Vec<IndexEntry>, DatasetError> {
    let text = read_text(path)?;
    let expected = INDEX_COLUMNS.join(",");
    let mut lines = numbered_lines(&text);
    let Some((header_line, header)) = lines.next() else {
        return Err(DatasetError::NoHeader {
            path: path.to_path_buf(),
            expected,
        });
    };
    let header: Vec<&str> = header.split(',').map(str::trim).collect();
    for (i, name) in header.iter().enumerate() {
        if header[..i].contains(name) {
            return Err(DatasetError::DuplicateColumn {
                path: path.to_path_buf(),
                line: header_line,
                column: (*name).to_string(),
            });
        }
    }
    let mut col = [0usize; 4];
    for (slot, name) in col.iter_mut().zip(INDEX_COLUMNS) {
        *slot =
            header
                .iter()
                .position(|h| *h == name)
                .ok_or_else(|| DatasetError::MissingColumn {
                    path: path.to_path_buf(),
                    line: header_line,
                    column: name.to_string(),
                    expected: expected.clone(),
                })?;
    }
    let recordings_dir = path.parent().unwrap_or(Path::new("")).join("recordings");
    let mut entries = Vec::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for (line, text) in lines {
        let fields: Vec<&str> = text.split(',').map(str::trim).collect();
        if fields.len() < header.len() {
            return Err(DatasetError::MissingValue {
                path: path.to_path_buf(),
                line,
                column: header[fields.len()].to_string(),
                expected: header.len(),
                found: fields.len(),
            });
        }
        if fields.len() > header.len() {
            return Err(DatasetError::ExtraValues {
                path: path.to_path_buf(),
                line,
                expected: header.len(),
                found: fields.len(),
            });
        }
        for (&c, name) in col.iter().zip(INDEX_COLUMNS) {
            if fields[c].is_empty() {
                return Err(DatasetError::EmptyValue {
                    path: path.to_path_buf(),
                    line,
                    column: name.to_string(),
                });
            }
        }
        let [id, subject, session, file] = col.map(|c| fields[c].to_string());
        if let Some(&first) = first_line.get(&id) {
            return Err(DatasetError::DuplicateRecording {
                path: path.to_path_buf(),
                line,
                id,
                first_line: first,
            });
        }
        first_line.insert(id.clone(), line);
        let relative = Path::new(&file);
        if !relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(DatasetError::BadFilePath {
                path: path.to_path_buf(),
                line,
                file,
            });
        }
        let mut file_path = recordings_dir.join(relative);
        if file_path.extension().is_none() {
            file_path.set_extension("csv");
        }
        if !file_path.is_file() {
            return Err(DatasetError::MissingFile {
                path: file_path,
                index: path.to_path_buf(),
                line,
            });
        }
        entries.push(IndexEntry {
            id,
            subject,
            session,
            file,
            path: file_path,
        });
    }
    if entries.is_empty() {
        return Err(DatasetError::NoRecordings {
            path: path.to_path_buf(),
        });
    }
    Ok(entries)
}

fn check_recording_header(
    path: &Path,
    line: usize,
    header: &str,
    expected: &[&str],
) -> Result<(), DatasetError> {
    let found: Vec<&str> = header.split(',').map(str::trim).collect();
    if found == expected {
        return Ok(());
    }
    let expected_text = expected.join(",");
    for (i, name) in found.iter().enumerate() {
        if found[..i].contains(name) {
            return Err(DatasetError::DuplicateColumn {
                path: path.to_path_buf(),
                line,
                column: (*name).to_string(),
            });
        }
    }
    if let Some(missing) = expected.iter().find(|e| !found.contains(e)) {
        return Err(DatasetError::MissingColumn {
            path: path.to_path_buf(),
            line,
            column: (*missing).to_string(),
            expected: expected_text,
        });
    }
    if let Some(extra) = found.iter().find(|f| !expected.contains(f)) {
        return Err(DatasetError::UnexpectedColumn {
            path: path.to_path_buf(),
            line,
            column: (*extra).to_string(),
            expected: expected_text,
        });
    }
    Err(DatasetError::ColumnOrder {
        path: path.to_path_buf(),
        line,
        expected: expected_text,
        found: found.join(","),
    })
}

type RecordingData = (Vec<f32>, Vec<Option<u16>>);

fn read_recording(
    path: &Path,
    meta: &DatasetMeta,
    classes: &HashMap<&str, u16>,
) -> Result<RecordingData, DatasetError> {
    let text = read_text(path)?;
    let mut expected: Vec<&str> = meta.channels.iter().map(|c| c.name.as_str()).collect();
    expected.push(LABEL_COLUMN);
    let mut lines = numbered_lines(&text);
    let Some((header_line, header)) = lines.next() else {
        return Err(DatasetError::NoHeader {
            path: path.to_path_buf(),
            expected: expected.join(","),
        });
    };
    check_recording_header(path, header_line, header, &expected)?;

    let c = meta.channels.len();
    let capacity = text.bytes().filter(|b| *b == b'\n').count();
    let mut samples = Vec::with_capacity(capacity * c);
    let mut labels = Vec::with_capacity(capacity);
    // Labels come in long runs: remember the last one to skip most hash lookups.
    let mut last_label: (&str, Option<u16>) = ("", None);
    for (line, text) in lines {
        let mut fields = text.split(',');
        let missing = |found: usize| DatasetError::MissingValue {
            path: path.to_path_buf(),
            line,
            column: expected[found].to_string(),
            expected: expected.len(),
            found,
        };
        for (ch, name) in expected[..c].iter().enumerate() {
            let field = fields.next().ok_or_else(|| missing(ch))?.trim();
            let value: f32 = field.parse().map_err(|_| DatasetError::NotNumeric {
                path: path.to_path_buf(),
                line,
                column: (*name).to_string(),
                value: field.to_string(),
            })?;
            if !value.is_finite() {
                return Err(DatasetError::NotFinite {
                    path: path.to_path_buf(),
                    line,
                    column: (*name).to_string(),
                    value: field.to_string(),
                });
            }
            samples.push(value);
        }
        let label = fields.next().ok_or_else(|| missing(c))?.trim();
        if fields.next().is_some() {
            return Err(DatasetError::ExtraValues {
                path: path.to_path_buf(),
                line,
                expected: expected.len(),
                found: text.split(',').count(),
            });
        }
        let class = if label.is_empty() {
            None
        } else if label == last_label.0 {
            last_label.1
        } else {
            let class = *classes
                .get(label)
                .ok_or_else(|| DatasetError::UnknownClass {
                    path: path.to_path_buf(),
                    line,
                    column: LABEL_COLUMN.to_string(),
                    value: label.to_string(),
                    known: meta.classes.join(", "),
                })?;
            last_label = (label, Some(class));
            Some(class)
        };
        labels.push(class);
    }
    Ok((samples, labels))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const META: &str = r#"{"name": "tiny", "sample_rate_hz": 10.0,
        "channels": [{"name": "x", "unit": "g"}, {"name": "y", "unit": "g"}],
        "classes": ["rest", "move"], "license": "CC0", "source": "hand-made"}"#;

    const INDEX: &str = "recording,subject,session,file\n\
        r1,1,0,r1.csv\n\
        r2,1,1,r2\n\
        r3,2,0,sub/r3.csv\n";

    fn write_dataset(meta: &str, index: &str, files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("dataset.json"), meta).unwrap();
        std::fs::write(dir.path().join("recordings.csv"), index).unwrap();
        for (name, content) in files {
            let path = dir.path().join("recordings").join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        dir
    }

    fn good_files() -> Vec<(&'static str, &'static str)> {
        vec![
            (
                "r1.csv",
                "x,y,label\n1.0,2.0,rest\n1.5,-2.5,rest\r\n3,4,\n5e-1,0,move\n",
            ),
            ("r2.csv", "x,y,label\n0,0,move\n\n1,1,move\n"),
            ("sub/r3.csv", "x , y , label\n7,8,rest\n"),
        ]
    }

    fn load_with_recording(content: &str) -> DatasetError {
        let mut files = good_files();
        files[0].1 = content;
        let dir = write_dataset(META, INDEX, &files);
        Dataset::load(dir.path()).unwrap_err()
    }

    #[test]
    fn good_dataset_loads_samples_and_labels_row_by_row() {
        let dir = write_dataset(META, INDEX, &good_files());
        let ds = Dataset::load(dir.path()).unwrap();
        assert_eq!(ds.meta.name, "tiny");
        assert_eq!(ds.meta.channels[1].unit, "g");
        assert_eq!(ds.recordings.len(), 3);
        let r1 = &ds.recordings[0];
        assert_eq!(
            (r1.id.as_str(), r1.subject.as_str(), r1.session.as_str()),
            ("r1", "1", "0")
        );
        assert_eq!(r1.rows(), 4);
        assert_eq!(r1.row(1), &[1.5, -2.5]);
        assert_eq!(r1.row(3), &[0.5, 0.0]);
        assert_eq!(r1.labels, vec![Some(0), Some(0), None, Some(1)]);
        assert_eq!(r1.rows_slice(1, 2), &[1.5, -2.5, 3.0, 4.0]);
        // Blank line skipped, extension appended to "r2".
        assert_eq!(ds.recordings[1].rows(), 2);
        assert_eq!(ds.recordings[1].file, "r2");
        assert_eq!(ds.recordings[2].row(0), &[7.0, 8.0]);
        assert_eq!(ds.subjects(), vec!["1", "2"]);
        assert_eq!(ds.sessions(), vec!["0", "1"]);
        assert_eq!(ds.rows(), 7);
    }

    #[test]
    fn summary_counts_rows_per_subject_session_and_class() {
        let dir = write_dataset(META, INDEX, &good_files());
        let summary = Dataset::load(dir.path()).unwrap().summary();
        assert_eq!(summary.sessions.len(), 3);
        let s = &summary.sessions[0];
        assert_eq!(
            (s.subject.as_str(), s.session.as_str(), s.rows),
            ("1", "0", 4)
        );
        assert_eq!(s.class_rows, vec![2, 1]);
        assert_eq!(s.unlabelled_rows, 1);
        assert_eq!(summary.class_rows, vec![3, 3]);
        assert_eq!(summary.unlabelled_rows, 1);
        let text = summary.to_string();
        assert!(text.contains("rest") && text.contains("total"), "{text}");
    }

    #[test]
    fn missing_column_is_reported_with_file_and_line() {
        let err = load_with_recording("x,label\n1,rest\n");
        assert!(
            matches!(&err, DatasetError::MissingColumn { column, line: 1, .. } if column == "y")
        );
        let msg = err.to_string();
        assert!(
            msg.contains("r1.csv") && msg.contains("line 1") && msg.contains("'y'"),
            "{msg}"
        );
    }

    #[test]
    fn extra_channel_column_is_reported() {
        let err = load_with_recording("x,y,z,label\n1,2,3,rest\n");
        assert!(
            matches!(&err, DatasetError::UnexpectedColumn { column, .. } if column == "z"),
            "{err}"
        );
    }

    #[test]
    fn columns_out_of_order_are_reported() {
        let err = load_with_recording("y,x,label\n1,2,rest\n");
        assert!(matches!(err, DatasetError::ColumnOrder { .. }), "{err}");
    }

    #[test]
    fn row_with_too_few_values_names_the_missing_column() {
        let err = load_with_recording("x,y,label\n1,2,rest\n3,4\n");
        assert!(
            matches!(&err, DatasetError::MissingValue { column, line: 3, expected: 3, found: 2, .. } if column == "label"),
            "{err}"
        );
    }

    #[test]
    fn row_with_too_many_values_is_rejected() {
        let err = load_with_recording("x,y,label\n1,2,rest,9\n");
        assert!(
            matches!(
                err,
                DatasetError::ExtraValues {
                    line: 2,
                    expected: 3,
                    found: 4,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn non_numeric_value_names_row_and_column() {
        let err = load_with_recording("x,y,label\n1,2,rest\n1,abc,rest\n");
        assert!(
            matches!(&err, DatasetError::NotNumeric { line: 3, column, value, .. } if column == "y" && value == "abc"),
            "{err}"
        );
        assert!(err.to_string().contains("expected a number, found 'abc'"));
    }

    #[test]
    fn nan_and_infinity_are_rejected() {
        for bad in ["NaN", "inf", "-inf", "1e99"] {
            let content = format!("x,y,label\n{bad},2,rest\n");
            let err = load_with_recording(&content);
            assert!(
                matches!(&err, DatasetError::NotFinite { line: 2, column, .. } if column == "x"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn unknown_class_is_rejected() {
        let err = load_with_recording("x,y,label\n1,2,jump\n");
        assert!(
            matches!(&err, DatasetError::UnknownClass { line: 2, value, .. } if value == "jump"),
            "{err}"
        );
        assert!(err.to_string().contains("rest, move"));
    }

    #[test]
    fn bad_dataset_json_is_rejected() {
        let dir = write_dataset("{\"name\": \"tiny\",", INDEX, &good_files());
        let err = Dataset::load(dir.path()).unwrap_err();
        assert!(matches!(err, DatasetError::BadMeta { .. }), "{err}");

        let meta = r#"{"name": "t", "sample_rate_hz": 0, "channels": [{"name": "x"}, {"name": "x"}],
            "classes": ["a", "a"]}"#;
        let dir = write_dataset(meta, INDEX, &good_files());
        let msg = Dataset::load(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("sample_rate_hz")
                && msg.contains("\"x\" is listed twice")
                && msg.contains("\"a\" is listed twice"),
            "{msg}"
        );
    }

    #[test]
    fn duplicate_recording_id_is_rejected() {
        let index = "recording,subject,session,file\nr1,1,0,r1.csv\nr1,1,1,r2.csv\n";
        let dir = write_dataset(META, index, &good_files());
        let err = Dataset::load(dir.path()).unwrap_err();
        assert!(
            matches!(&err, DatasetError::DuplicateRecording { id, line: 3, first_line: 2, .. } if id == "r1"),
            "{err}"
        );
    }

    #[test]
    fn missing_recording_file_is_reported_with_index_line() {
        let index = "recording,subject,session,file\nr1,1,0,r1.csv\nr9,1,1,nope.csv\n";
        let dir = write_dataset(META, index, &good_files());
        let err = Dataset::load(dir.path()).unwrap_err();
        assert!(
            matches!(err, DatasetError::MissingFile { line: 3, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("nope.csv"));
    }

    #[test]
    fn missing_index_column_and_escaping_paths_are_rejected() {
        let dir = write_dataset(META, "recording,subject,file\nr1,1,r1.csv\n", &good_files());
        let err = Dataset::load(dir.path()).unwrap_err();
        assert!(matches!(&err, DatasetError::MissingColumn { column, .. } if column == "session"));

        let dir = write_dataset(
            META,
            "recording,subject,session,file\nr1,1,0,../x.csv\n",
            &good_files(),
        );
        let err = Dataset::load(dir.path()).unwrap_err();
        assert!(
            matches!(err, DatasetError::BadFilePath { line: 2, .. }),
            "{err}"
        );

        let dir = write_dataset(
            META,
            "recording,subject,session,file\nr1,,0,r1.csv\n",
            &good_files(),
        );
        let err = Dataset::load(dir.path()).unwrap_err();
        assert!(matches!(&err, DatasetError::EmptyValue { column, .. } if column == "subject"));
    }

    #[test]
    fn missing_dataset_json_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Dataset::load(dir.path()).unwrap_err();
        assert!(matches!(err, DatasetError::Io { .. }));
        assert!(err.to_string().contains("dataset.json"));
    }

    #[test]
    fn from_parts_rejects_inconsistent_recordings() {
        let meta: DatasetMeta = serde_json::from_str(META).unwrap();
        let rec = Recording {
            id: "a".into(),
            subject: "1".into(),
            session: "0".into(),
            file: "a.csv".into(),
            channels: 2,
            samples: vec![0.0; 5],
            labels: vec![None, None],
        };
        assert!(Dataset::from_parts(meta.clone(), vec![rec.clone()]).is_err());
        let ok = Recording {
            samples: vec![0.0; 4],
            ..rec.clone()
        };
        assert!(Dataset::from_parts(meta.clone(), vec![ok.clone()]).is_ok());
        let bad_label = Recording {
            labels: vec![Some(2), None],
            ..ok
        };
        assert!(Dataset::from_parts(meta, vec![bad_label]).is_err());
    }
}
