//! Reading labelled text: one document per txt line, jsonl record or csv row, selected by a
//! numeric label threshold.
//!
//! Labelled corpora come in these three shapes (the Jigsaw files are csv with a header and
//! multi-line quoted comments; most exports are jsonl). Documents are streamed to a callback so
//! that a large input never sits in memory as text. Every problem names the file and line and
//! is raised while reading, i.e. before the model runs and before anything is written: a bad
//! row must never produce half a datastore. The csv reader is a small RFC 4180 parser (quoted
//! fields, `""` escapes, newlines inside quotes, CRLF), which is all these files need.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;

use super::BuildError;

/// How an input file is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    /// One document per line; blank lines are skipped. No labels.
    Txt,
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated with a header row.
    Csv,
}

impl InputFormat {
    /// The format implied by a file name's extension (`.txt`, `.jsonl`/`.ndjson`, `.csv`).
    pub fn from_path(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "txt" | "text" => Some(InputFormat::Txt),
            "jsonl" | "ndjson" => Some(InputFormat::Jsonl),
            "csv" => Some(InputFormat::Csv),
            _ => None,
        }
    }

    /// The name `--format` takes and provenance records; the inverse of its `FromStr`.
    pub fn as_str(self) -> &'static str {
        match self {
            InputFormat::Txt => "txt",
            InputFormat::Jsonl => "jsonl",
            InputFormat::Csv => "csv",
        }
    }
}

impl FromStr for InputFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "txt" => Ok(InputFormat::Txt),
            "jsonl" => Ok(InputFormat::Jsonl),
            "csv" => Ok(InputFormat::Csv),
            _ => Err(format!(
                "unknown input format {s:?}: expected txt, jsonl or csv"
            )),
        }
    }
}

/// Keeps documents whose numeric label lies in `[min, max]` (either bound optional).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LabelFilter {
    /// The jsonl/csv field holding the label, e.g. `toxicity`; its value must be a number.
    pub field: String,
    /// Inclusive lower bound (e.g. 0.8 to select toxic documents); finite when given.
    pub min: Option<f64>,
    /// Inclusive upper bound (e.g. 0.1 to select non-toxic ones); finite when given.
    pub max: Option<f64>,
}

impl LabelFilter {
    /// Whether a document with label `x` passes: both bounds inclusive, a missing bound open.
    pub fn keeps(&self, x: f64) -> bool {
        self.min.is_none_or(|m| x >= m) && self.max.is_none_or(|m| x <= m)
    }

    /// A short description for provenance records, e.g. `toxicity >= 0.5`.
    pub fn describe(&self) -> String {
        match (self.min, self.max) {
            (Some(a), Some(b)) => format!("{a} <= {} <= {b}", self.field),
            (Some(a), None) => format!("{} >= {a}", self.field),
            (None, Some(b)) => format!("{} <= {b}", self.field),
            (None, None) => format!("{} (any)", self.field),
        }
    }
}

/// Which files to read and which documents to keep.
#[derive(Clone, Debug, Serialize)]
pub struct InputSpec {
    /// Input files, read in this order (which fixes the order of rows in the store).
    pub paths: Vec<PathBuf>,
    /// `None`: from each file's extension.
    pub format: Option<InputFormat>,
    /// The text field of jsonl records and csv rows.
    pub text_field: String,
    /// `None`: every document with non-blank text is kept (the only choice for txt).
    pub filter: Option<LabelFilter>,
}

impl InputSpec {
    /// Checks the options without reading anything.
    pub fn validate(&self) -> Result<(), BuildError> {
        if self.paths.is_empty() {
            return Err(BuildError::Options("no input files given".into()));
        }
        if let Some(f) = &self.filter {
            if f.min.is_none() && f.max.is_none() {
                return Err(BuildError::Options(format!(
                    "label field {:?} given without --min-label or --max-label",
                    f.field
                )));
            }
            for b in [f.min, f.max].into_iter().flatten() {
                if !b.is_finite() {
                    return Err(BuildError::Options(format!(
                        "label bound {b} is not finite"
                    )));
                }
            }
            if let (Some(a), Some(b)) = (f.min, f.max) {
                if a > b {
                    return Err(BuildError::Options(format!(
                        "--min-label {a} is above --max-label {b}: no document could pass"
                    )));
                }
            }
        }
        for p in &self.paths {
            let fmt = self.format_of(p)?;
            if fmt == InputFormat::Txt && self.filter.is_some() {
                return Err(BuildError::Options(format!(
                    "{} is plain text, which has no labels; use jsonl or csv with --label-field",
                    p.display()
                )));
            }
        }
        Ok(())
    }

    /// The format `path` is read as: the explicit one, or else the extension's; an error
    /// naming `--format` when neither tells.
    pub fn format_of(&self, path: &Path) -> Result<InputFormat, BuildError> {
        self.format
            .or_else(|| InputFormat::from_path(path))
            .ok_or_else(|| {
                BuildError::Options(format!(
                    "cannot tell the format of {} from its extension; pass --format txt|jsonl|csv",
                    path.display()
                ))
            })
    }
}

/// Counts of one input file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FileStats {
    /// The input file.
    pub path: PathBuf,
    /// Records read (non-blank lines, json objects, csv rows).
    pub records: usize,
    /// Records that passed the label filter and had non-blank text.
    pub selected: usize,
}

/// Reads every input and calls `on_doc` with the text of each selected document, in file and
/// record order. Fails on the first problem, naming the file and line.
pub fn read_documents(
    spec: &InputSpec,
    mut on_doc: impl FnMut(String) -> Result<(), BuildError>,
) -> Result<Vec<FileStats>, BuildError> {
    spec.validate()?;
    let mut all = Vec::new();
    for path in &spec.paths {
        let fmt = spec.format_of(path)?;
        let file = File::open(path).map_err(|e| BuildError::io("open", path, e))?;
        let reader = BufReader::new(file);
        let mut st = FileStats {
            path: path.clone(),
            ..FileStats::default()
        };
        let mut emit = |text: &str, label: Option<f64>, st: &mut FileStats| {
            st.records += 1;
            if let (Some(f), Some(x)) = (&spec.filter, label) {
                if !f.keeps(x) {
                    return Ok(());
                }
            }
            let t = text.trim();
            if t.is_empty() {
                return Ok(());
            }
            st.selected += 1;
            on_doc(t.to_string())
        };
        match fmt {
            InputFormat::Txt => {
                for line in reader.lines() {
                    let line = line.map_err(|e| BuildError::io("read", path, e))?;
                    if !line.trim().is_empty() {
                        emit(&line, None, &mut st)?;
                    }
                }
            }
            InputFormat::Jsonl => {
                for (i, line) in reader.lines().enumerate() {
                    let line = line.map_err(|e| BuildError::io("read", path, e))?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let (text, label) = jsonl_record(spec, path, i + 1, &line)?;
                    emit(&text, label, &mut st)?;
                }
            }
            InputFormat::Csv => {
                let mut rows = CsvReader::new(reader);
                let header = match rows.next_record().map_err(|e| csv_err(e, path))? {
                    Some((_, h)) => h,
                    None => return Err(BuildError::EmptyInput(path.clone())),
                };
                let col = |name: &str| -> Result<usize, BuildError> {
                    header
                        .iter()
                        .position(|h| h.trim().trim_start_matches('\u{feff}') == name)
                        .ok_or_else(|| BuildError::MissingField {
                            path: path.clone(),
                            line: 1,
                            field: name.to_string(),
                            available: header.join(", "),
                        })
                };
                let text_col = col(&spec.text_field)?;
                let label_col = spec.filter.as_ref().map(|f| col(&f.field)).transpose()?;
                while let Some((line, row)) = rows.next_record().map_err(|e| csv_err(e, path))? {
                    if row.len() == 1 && row[0].is_empty() {
                        continue; // a blank line
                    }
                    if row.len() != header.len() {
                        return Err(BuildError::BadRecord {
                            path: path.clone(),
                            line,
                            detail: format!(
                                "{} fields, the header has {}",
                                row.len(),
                                header.len()
                            ),
                        });
                    }
                    let label = match (label_col, &spec.filter) {
                        (Some(c), Some(f)) => Some(parse_label(&row[c], path, line, &f.field)?),
                        _ => None,
                    };
                    emit(&row[text_col], label, &mut st)?;
                }
            }
        }
        if st.records == 0 {
            return Err(BuildError::EmptyInput(path.clone()));
        }
        all.push(st);
    }
    Ok(all)
}

fn jsonl_record(
    spec: &InputSpec,
    path: &Path,
    line: usize,
    raw: &str,
) -> Result<(String, Option<f64>), BuildError> {
    let v: serde_json::Value = serde_json::from_str(raw).map_err(|e| BuildError::BadRecord {
        path: path.to_path_buf(),
        line,
        detail: format!("not valid JSON: {e}"),
    })?;
    let obj = v.as_object().ok_or_else(|| BuildError::BadRecord {
        path: path.to_path_buf(),
        line,
        detail: "not a JSON object".into(),
    })?;
    let missing = |field: &str| BuildError::MissingField {
        path: path.to_path_buf(),
        line,
        field: field.to_string(),
        available: obj.keys().cloned().collect::<Vec<_>>().join(", "),
    };
    let text = match obj.get(&spec.text_field) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) => String::new(),
        Some(other) => {
            return Err(BuildError::BadRecord {
                path: path.to_path_buf(),
                line,
                detail: format!("field {:?} is {other}, not a string", spec.text_field),
            })
        }
        None => return Err(missing(&spec.text_field)),
    };
    let label = match &spec.filter {
        None => None,
        Some(f) => {
            let raw = obj.get(&f.field).ok_or_else(|| missing(&f.field))?;
            let x = match raw {
                serde_json::Value::Number(n) => n.as_f64(),
                serde_json::Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
                serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            };
            match x {
                Some(x) if x.is_finite() => Some(x),
                _ => {
                    return Err(BuildError::BadLabel {
                        path: path.to_path_buf(),
                        line,
                        field: f.field.clone(),
                        value: raw.to_string(),
                    })
                }
            }
        }
    };
    Ok((text, label))
}

fn parse_label(raw: &str, path: &Path, line: usize, field: &str) -> Result<f64, BuildError> {
    match raw.trim().parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        _ => Err(BuildError::BadLabel {
            path: path.to_path_buf(),
            line,
            field: field.to_string(),
            value: format!("{raw:?}"),
        }),
    }
}

/// A csv syntax error at a line.
#[derive(Debug)]
pub(crate) enum CsvError {
    Io(std::io::Error),
    UnterminatedQuote { line: usize },
    StrayQuote { line: usize },
}

fn csv_err(e: CsvError, path: &Path) -> BuildError {
    match e {
        CsvError::Io(e) => BuildError::io("read", path, e),
        CsvError::UnterminatedQuote { line } => BuildError::BadRecord {
            path: path.to_path_buf(),
            line,
            detail: "a quoted field is never closed".into(),
        },
        CsvError::StrayQuote { line } => BuildError::BadRecord {
            path: path.to_path_buf(),
            line,
            detail: "a quote inside an unquoted field (quote the field and double the quote)"
                .into(),
        },
    }
}

/// RFC 4180 records from a reader, each with the line it starts on (1-based).
pub(crate) struct CsvReader<R> {
    inner: R,
    line: usize,
    buf: String,
}

impl<R: BufRead> CsvReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            line: 0,
            buf: String::new(),
        }
    }

    pub(crate) fn next_record(&mut self) -> Result<Option<(usize, Vec<String>)>, CsvError> {
        let start = self.line + 1;
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut quoted = false; // inside a quoted field
        let mut was_quoted = false; // the current field started with a quote
        let mut any = false;
        loop {
            self.buf.clear();
            let n = self.inner.read_line(&mut self.buf).map_err(CsvError::Io)?;
            if n == 0 {
                if quoted {
                    return Err(CsvError::UnterminatedQuote { line: start });
                }
                if !any {
                    return Ok(None);
                }
                fields.push(field);
                return Ok(Some((start, fields)));
            }
            any = true;
            self.line += 1;
            let mut chars = self.buf.chars().peekable();
            while let Some(c) = chars.next() {
                if quoted {
                    if c == '"' {
                        if chars.peek() == Some(&'"') {
                            chars.next();
                            field.push('"');
                        } else {
                            quoted = false;
                        }
                    } else {
                        field.push(c);
                    }
                    continue;
                }
                match c {
                    '"' if field.is_empty() && !was_quoted => {
                        quoted = true;
                        was_quoted = true;
                    }
                    '"' => return Err(CsvError::StrayQuote { line: self.line }),
                    ',' => {
                        fields.push(std::mem::take(&mut field));
                        was_quoted = false;
                    }
                    '\r' if chars.peek() == Some(&'\n') => {}
                    '\n' => {
                        fields.push(std::mem::take(&mut field));
                        return Ok(Some((start, fields)));
                    }
                    c => field.push(c),
                }
            }
            if !quoted {
                // Last line without a trailing newline.
                fields.push(field);
                return Ok(Some((start, fields)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(s: &str) -> Result<Vec<(usize, Vec<String>)>, CsvError> {
        let mut r = CsvReader::new(s.as_bytes());
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push(rec);
        }
        Ok(out)
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn csv_handles_quotes_escapes_and_multiline_fields() {
        let got =
            records("id,text,label\r\n1,\"a, \"\"quoted\"\"\nline\",0.5\n2,plain,1\n3,,x").unwrap();
        assert_eq!(
            got,
            vec![
                (1, strs(&["id", "text", "label"])),
                (2, strs(&["1", "a, \"quoted\"\nline", "0.5"])),
                (4, strs(&["2", "plain", "1"])),
                (5, strs(&["3", "", "x"])),
            ]
        );
    }

    #[test]
    fn csv_syntax_errors_name_the_line() {
        assert!(matches!(
            records("a,b\n1,\"open\n2,3\n"),
            Err(CsvError::UnterminatedQuote { line: 2 })
        ));
        assert!(matches!(
            records("a,b\n1,x\"y\n"),
            Err(CsvError::StrayQuote { line: 2 })
        ));
    }

    #[test]
    fn label_filter_bounds_are_inclusive() {
        let f = LabelFilter {
            field: "t".into(),
            min: Some(0.5),
            max: None,
        };
        assert!(f.keeps(0.5) && f.keeps(1.0) && !f.keeps(0.49));
        let g = LabelFilter {
            field: "t".into(),
            min: None,
            max: Some(0.0),
        };
        assert!(g.keeps(0.0) && g.keeps(-1.0) && !g.keeps(0.01));
        assert_eq!(f.describe(), "t >= 0.5");
    }
}
