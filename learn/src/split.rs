//! Split configuration and the split itself, the last stage of the data path:
//! TOML → [`SplitConfig`] (raw, `deny_unknown_fields`) → [`Split::build`] validates it
//! against a [`Dataset`], reporting every problem at once → [`Split`]: the standardised
//! [`WindowSet`]s each training and evaluation step uses.
//!
//! Parts (all windows cut with the configured [`WindowSpec`]):
//! - `presumed_train` / `presumed_val`: labelled windows of the manufacturer's subjects
//!   (without / only `validation_subjects`) in the manufacturer's sessions whose label is a
//!   presumed class.
//! - `pool`: every window of the pool subjects in the pool sessions, labels discarded; with
//!   `include_unlabelled`, also the windows of the manufacturer's training subjects and
//!   sessions that have no presumed label (unlabelled, mixed/transition or a non-presumed
//!   class). Validation subjects never enter the pool, so they stay unseen.
//! - `users`: per user subject, the labelled windows of the user session (all its
//!   recordings, in `recordings.csv` order = time order). `exclusive` holds, for *each*
//!   class, the first `ceil(exclusive_fraction · n_class)` of that class's windows in time
//!   order (so every class the user has is represented); `test` holds the other labelled
//!   windows except those sharing raw rows with an exclusive window. A per-class cut is
//!   needed because sessions are not class-balanced over time.
//! - `presumed_test`: labelled windows of a presumed class of the test subjects/sessions.
//!
//! Label space: [`Split::classes`] = the presumed classes in config order, then the other
//! dataset classes that occur in user windows, in dataset order; every `WindowSet::y`
//! indexes into it. The standardiser is fitted on `presumed_train` only.

use crate::dataset::Dataset;
use crate::window::{windows, Standardizer, WindowRef, WindowSet, WindowSpec};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

/// Everything wrong with a split configuration, reported together.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct SplitError {
    pub problems: Vec<String>,
}

impl fmt::Display for SplitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid split configuration ({} problem",
            self.problems.len()
        )?;
        write!(f, "{}):", if self.problems.len() == 1 { "" } else { "s" })?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl SplitError {
    fn one(problem: String) -> Self {
        SplitError {
            problems: vec![problem],
        }
    }
}

/// Raw split configuration as written in TOML. Subject and session ids may be TOML
/// integers or strings; both become strings. Validated by [`SplitConfig::check`] and
/// [`Split::build`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    pub name: String,
    pub window: WindowConfig,
    pub manufacturer: ManufacturerConfig,
    #[serde(default)]
    pub pool: PoolConfig,
    pub users: UsersConfig,
    pub presumed_test: PresumedTestConfig,
}

/// Window length and stride in samples; signed so that bad values can be reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    pub len: i64,
    pub stride: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManufacturerConfig {
    #[serde(deserialize_with = "ids")]
    pub subjects: Vec<String>,
    #[serde(deserialize_with = "ids")]
    pub sessions: Vec<String>,
    /// The presumed classes, in the order of the model's outputs.
    pub classes: Vec<String>,
    /// Subjects of `subjects` held out of training, for early stopping and the deploy gate.
    #[serde(default, deserialize_with = "ids")]
    pub validation_subjects: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    #[serde(default, deserialize_with = "ids")]
    pub subjects: Vec<String>,
    #[serde(default, deserialize_with = "ids")]
    pub sessions: Vec<String>,
    #[serde(default)]
    pub include_unlabelled: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersConfig {
    #[serde(deserialize_with = "ids")]
    pub subjects: Vec<String>,
    #[serde(deserialize_with = "id")]
    pub session: String,
    pub exclusive_fraction: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresumedTestConfig {
    #[serde(deserialize_with = "ids")]
    pub subjects: Vec<String>,
    #[serde(deserialize_with = "ids")]
    pub sessions: Vec<String>,
}

struct Id(String);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct IdVisitor;
        impl Visitor<'_> for IdVisitor {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a subject or session id (a string or an integer)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Id, E> {
                Ok(Id(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Id, E> {
                Ok(Id(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Id, E> {
                Ok(Id(v.to_string()))
            }
        }
        d.deserialize_any(IdVisitor)
    }
}

fn ids<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Vec::<Id>::deserialize(d)?
        .into_iter()
        .map(|i| i.0)
        .collect())
}

fn id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Id::deserialize(d)?.0)
}

impl SplitConfig {
    pub fn from_toml_str(text: &str) -> Result<SplitConfig, SplitError> {
        toml::from_str(text).map_err(|e| SplitError::one(e.to_string()))
    }

    pub fn from_file(path: &Path) -> Result<SplitConfig, SplitError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SplitError::one(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| SplitError::one(format!("{}: {e}", path.display())))
    }

    /// Problems that need no dataset to find (empty if none). [`Split::build`] reports
    /// these together with the dataset-dependent ones.
    pub fn check(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.name.trim().is_empty() {
            p.push("name must not be empty".to_string());
        }
        if self.window.len < 1 {
            p.push(format!(
                "window.len must be at least 1, found {}",
                self.window.len
            ));
        }
        if self.window.stride < 1 {
            p.push(format!(
                "window.stride must be at least 1, found {}",
                self.window.stride
            ));
        }

        let m = &self.manufacturer;
        non_empty_unique(&mut p, "manufacturer.subjects", &m.subjects);
        non_empty_unique(&mut p, "manufacturer.sessions", &m.sessions);
        non_empty_unique(&mut p, "manufacturer.classes", &m.classes);
        non_empty_unique(
            &mut p,
            "manufacturer.validation_subjects",
            &m.validation_subjects,
        );
        for s in &m.validation_subjects {
            if !m.subjects.contains(s) {
                p.push(format!(
                    "manufacturer.validation_subjects: subject '{s}' is not in manufacturer.subjects"
                ));
            }
        }
        if !m.subjects.is_empty() && m.subjects.iter().all(|s| m.validation_subjects.contains(s)) {
            p.push(
                "manufacturer.validation_subjects holds every manufacturer subject, none is left for training"
                    .to_string(),
            );
        }

        let pool = &self.pool;
        unique(&mut p, "pool.subjects", &pool.subjects);
        unique(&mut p, "pool.sessions", &pool.sessions);
        if pool.subjects.is_empty() != pool.sessions.is_empty() {
            p.push("pool.subjects and pool.sessions must both be set or both be empty".to_string());
        }
        if pool.subjects.is_empty() && !pool.include_unlabelled {
            p.push(
                "the pool is empty: set pool.subjects and pool.sessions, or include_unlabelled = true"
                    .to_string(),
            );
        }
        for s in &pool.subjects {
            if m.validation_subjects.contains(s) {
                p.push(format!(
                    "pool.subjects: subject '{s}' is a validation subject, which must stay unseen"
                ));
            } else if m.subjects.contains(s) {
                for session in pool.sessions.iter().filter(|x| m.sessions.contains(x)) {
                    p.push(format!(
                        "pool: subject '{s}' session '{session}' is already manufacturer training data"
                    ));
                }
            }
            if self.users.subjects.contains(s) {
                p.push(format!("pool.subjects: subject '{s}' is also a user"));
            }
            if self.presumed_test.subjects.contains(s) {
                p.push(format!(
                    "pool.subjects: subject '{s}' is also a presumed_test subject"
                ));
            }
        }

        let u = &self.users;
        if u.subjects.is_empty() {
            p.push("users.subjects must list at least one subject".to_string());
        }
        for (i, s) in u.subjects.iter().enumerate() {
            if u.subjects[..i].contains(s) {
                p.push(format!(
                    "users.subjects: subject '{s}' is listed twice, its user portions would overlap"
                ));
            }
            if m.subjects.contains(s) {
                p.push(format!(
                    "subject '{s}' is both a manufacturer subject and a user"
                ));
            }
        }
        if u.session.is_empty() {
            p.push("users.session must not be empty".to_string());
        }
        if !(u.exclusive_fraction > 0.0 && u.exclusive_fraction < 1.0) {
            p.push(format!(
                "users.exclusive_fraction must be strictly between 0 and 1, found {}",
                u.exclusive_fraction
            ));
        }

        let t = &self.presumed_test;
        non_empty_unique(&mut p, "presumed_test.subjects", &t.subjects);
        non_empty_unique(&mut p, "presumed_test.sessions", &t.sessions);
        for s in &t.subjects {
            if m.subjects.contains(s) {
                p.push(format!(
                    "presumed_test.subjects: subject '{s}' is a manufacturer subject, the test would see training subjects"
                ));
            }
        }
        p
    }
}

fn unique(p: &mut Vec<String>, field: &str, items: &[String]) {
    for (i, s) in items.iter().enumerate() {
        if items[..i].contains(s) {
            p.push(format!("{field}: '{s}' is listed twice"));
        }
    }
}

fn non_empty_unique(p: &mut Vec<String>, field: &str, items: &[String]) {
    if items.is_empty() {
        p.push(format!("{field} must not be empty"));
    }
    unique(p, field, items);
}

/// A preview of a list for error messages.
fn listing(items: &[&str]) -> String {
    const MAX: usize = 40;
    let mut out = items
        .iter()
        .take(MAX)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > MAX {
        out.push_str(&format!(", … ({} in all)", items.len()));
    }
    out
}

/// One user's data: `exclusive` is what the user labels for adaptation on the gateway,
/// `test` is held out to measure it.
#[derive(Clone, Debug, PartialEq)]
pub struct UserSplit {
    pub subject: String,
    pub exclusive: WindowSet,
    pub test: WindowSet,
}

/// A validated, materialised split. All `WindowSet`s are standardised with `standardizer`
/// and their `y` index into `classes`; `pool` is unlabelled.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    pub name: String,
    pub window: WindowSpec,
    pub channels: Vec<String>,
    pub sample_rate_hz: f64,
    pub classes: Vec<String>,
    /// `classes[..num_presumed]` are the manufacturer's presumed classes.
    pub num_presumed: usize,
    pub standardizer: Standardizer,
    pub presumed_train: WindowSet,
    pub presumed_val: WindowSet,
    pub pool: WindowSet,
    pub presumed_test: WindowSet,
    pub users: Vec<UserSplit>,
}

impl Split {
    pub fn build(cfg: &SplitConfig, ds: &Dataset) -> Result<Split, SplitError> {
        let mut problems = cfg.check();
        if let Err(e) = ds.validate() {
            problems.push(format!("dataset '{}': {e}", ds.meta.name));
        }
        check_against_dataset(cfg, ds, &mut problems);
        if !problems.is_empty() {
            return Err(SplitError { problems });
        }
        // `check` guarantees len, stride >= 1.
        let spec = WindowSpec::new(
            usize::try_from(cfg.window.len).unwrap_or(1),
            usize::try_from(cfg.window.stride).unwrap_or(1),
        )
        .map_err(|e| SplitError::one(e.to_string()))?;
        let len = spec.len();
        let meta = &ds.meta;
        let k = meta.classes.len();

        // Dataset class index → split class index; presumed classes first.
        let mut class_map: Vec<Option<u32>> = vec![None; k];
        for (i, name) in cfg.manufacturer.classes.iter().enumerate() {
            if let Some(c) = meta.class_index(name) {
                class_map[usize::from(c)] = Some(i as u32);
            }
        }
        let num_presumed = cfg.manufacturer.classes.len();
        let presumed = |w: &WindowRef| w.label.and_then(|c| class_map[usize::from(c)]);

        let set = |items: &[String]| -> HashSet<String> { items.iter().cloned().collect() };
        let m_subjects = set(&cfg.manufacturer.subjects);
        let m_sessions = set(&cfg.manufacturer.sessions);
        let val_subjects = set(&cfg.manufacturer.validation_subjects);
        let pool_subjects = set(&cfg.pool.subjects);
        let pool_sessions = set(&cfg.pool.sessions);
        let test_subjects = set(&cfg.presumed_test.subjects);
        let test_sessions = set(&cfg.presumed_test.sessions);

        let mut train = Labelled::default();
        let mut val = Labelled::default();
        let mut test = Labelled::default();
        let mut pool: Vec<WindowRef> = Vec::new();
        for (i, rec) in ds.recordings.iter().enumerate() {
            let (subject, session) = (&rec.subject, &rec.session);
            if m_subjects.contains(subject) && m_sessions.contains(session) {
                let validation = val_subjects.contains(subject);
                for w in windows(i, rec, spec) {
                    match presumed(&w) {
                        Some(y) if validation => val.push(w, y),
                        Some(y) => train.push(w, y),
                        None if cfg.pool.include_unlabelled && !validation => pool.push(w),
                        None => {}
                    }
                }
            }
            if pool_subjects.contains(subject) && pool_sessions.contains(session) {
                pool.extend(windows(i, rec, spec));
            }
            if test_subjects.contains(subject) && test_sessions.contains(session) {
                for w in windows(i, rec, spec) {
                    if let Some(y) = presumed(&w) {
                        test.push(w, y);
                    }
                }
            }
        }

        let users: Vec<(String, Vec<WindowRef>, Vec<WindowRef>)> = cfg
            .users
            .subjects
            .iter()
            .map(|subject| {
                let (exclusive, test) = user_portions(ds, subject, cfg, spec);
                (subject.clone(), exclusive, test)
            })
            .collect();

        // Non-presumed classes the users have, in dataset order.
        let mut user_classes = vec![false; k];
        for (_, exclusive, test) in &users {
            for w in exclusive.iter().chain(test) {
                if let Some(c) = w.label {
                    user_classes[usize::from(c)] = true;
                }
            }
        }
        let mut classes = cfg.manufacturer.classes.clone();
        for (c, name) in meta.classes.iter().enumerate() {
            if user_classes[c] && class_map[c].is_none() {
                class_map[c] = Some(classes.len() as u32);
                classes.push(name.clone());
            }
        }

        let mut problems = Vec::new();
        let mut require = |what: String, n: usize| {
            if n == 0 {
                problems.push(format!("{what} has no windows of length {len}"));
            }
        };
        require("presumed_train".into(), train.refs.len());
        require("presumed_val".into(), val.refs.len());
        require("pool".into(), pool.len());
        require("presumed_test".into(), test.refs.len());
        for (subject, exclusive, test) in &users {
            require(format!("user '{subject}' exclusive set"), exclusive.len());
            require(format!("user '{subject}' test set"), test.len());
        }
        if !problems.is_empty() {
            return Err(SplitError { problems });
        }

        let to_problem = |e: crate::window::WindowError| SplitError::one(e.to_string());
        let standardizer =
            Standardizer::fit(&ds.recordings, &train.refs, len).map_err(to_problem)?;
        let build = |refs: Vec<WindowRef>, y: Vec<u32>| {
            WindowSet::build(&ds.recordings, refs, y, len, &standardizer).map_err(to_problem)
        };
        let user_labels = |refs: &[WindowRef]| -> Vec<u32> {
            refs.iter()
                .filter_map(|w| w.label.and_then(|c| class_map[usize::from(c)]))
                .collect()
        };
        let mut user_splits = Vec::with_capacity(users.len());
        for (subject, exclusive, test) in users {
            let (ey, ty) = (user_labels(&exclusive), user_labels(&test));
            user_splits.push(UserSplit {
                subject,
                exclusive: build(exclusive, ey)?,
                test: build(test, ty)?,
            });
        }
        Ok(Split {
            name: cfg.name.clone(),
            window: spec,
            channels: meta.channel_names(),
            sample_rate_hz: meta.sample_rate_hz,
            classes,
            num_presumed,
            presumed_train: build(train.refs, train.y)?,
            presumed_val: build(val.refs, val.y)?,
            pool: build(pool, Vec::new())?,
            presumed_test: build(test.refs, test.y)?,
            users: user_splits,
            standardizer,
        })
    }

    /// Window counts per part and class, for the CLI.
    pub fn summary(&self) -> SplitSummary {
        let k = self.classes.len();
        let part = |name: String, set: &WindowSet| PartSummary {
            part: name,
            windows: set.n(),
            per_class: if set.is_labelled() {
                set.class_counts(k)
            } else {
                Vec::new()
            },
        };
        let mut parts = vec![
            part("presumed_train".into(), &self.presumed_train),
            part("presumed_val".into(), &self.presumed_val),
            part("pool".into(), &self.pool),
            part("presumed_test".into(), &self.presumed_test),
        ];
        let mut totals = [(0usize, vec![0usize; k]), (0usize, vec![0usize; k])];
        for user in &self.users {
            for (i, (kind, set)) in [("exclusive", &user.exclusive), ("test", &user.test)]
                .into_iter()
                .enumerate()
            {
                let summary = part(format!("user {} {kind}", user.subject), set);
                totals[i].0 += summary.windows;
                for (t, n) in totals[i].1.iter_mut().zip(&summary.per_class) {
                    *t += n;
                }
                parts.push(summary);
            }
        }
        for (kind, (windows, per_class)) in ["exclusive", "test"].into_iter().zip(totals) {
            parts.push(PartSummary {
                part: format!("users {kind}"),
                windows,
                per_class,
            });
        }
        SplitSummary {
            name: self.name.clone(),
            window: self.window,
            classes: self.classes.clone(),
            num_presumed: self.num_presumed,
            parts,
        }
    }
}

#[derive(Default)]
struct Labelled {
    refs: Vec<WindowRef>,
    y: Vec<u32>,
}

impl Labelled {
    fn push(&mut self, w: WindowRef, y: u32) {
        self.refs.push(w);
        self.y.push(y);
    }
}

/// Exclusive and test windows of one user, both in time order (see the module docs).
fn user_portions(
    ds: &Dataset,
    subject: &str,
    cfg: &SplitConfig,
    spec: WindowSpec,
) -> (Vec<WindowRef>, Vec<WindowRef>) {
    let labelled: Vec<WindowRef> = ds
        .recordings
        .iter()
        .enumerate()
        .filter(|(_, r)| r.subject == subject && r.session == cfg.users.session)
        .flat_map(|(i, r)| windows(i, r, spec))
        .filter(|w| w.label.is_some())
        .collect();
    let mut per_class: HashMap<u16, usize> = HashMap::new();
    for w in &labelled {
        if let Some(c) = w.label {
            *per_class.entry(c).or_default() += 1;
        }
    }
    let fraction = cfg.users.exclusive_fraction;
    // ceil, with a tolerance so that e.g. 0.3 · 10 (= 3.0000000000000004) gives 3.
    let quota: HashMap<u16, usize> = per_class
        .into_iter()
        .map(|(c, n)| {
            (
                c,
                ((fraction * n as f64 - 1e-9).ceil().max(1.0) as usize).min(n),
            )
        })
        .collect();
    let mut taken: HashMap<u16, usize> = HashMap::new();
    let mut exclusive = Vec::new();
    let mut rest = Vec::new();
    for w in labelled {
        let Some(c) = w.label else { continue };
        let t = taken.entry(c).or_default();
        if *t < quota.get(&c).copied().unwrap_or(0) {
            *t += 1;
            exclusive.push(w);
        } else {
            rest.push(w);
        }
    }
    // `exclusive` is sorted by (recording, start); an overlapping exclusive window, if any,
    // is the first one at or after start - (len - 1).
    let len = spec.len();
    let test = rest
        .into_iter()
        .filter(|w| {
            let from = (w.recording, w.start.saturating_sub(len - 1));
            let i = exclusive.partition_point(|e| (e.recording, e.start) < from);
            !exclusive.get(i).is_some_and(|e| e.overlaps(w, len))
        })
        .collect();
    (exclusive, test)
}

fn check_against_dataset(cfg: &SplitConfig, ds: &Dataset, p: &mut Vec<String>) {
    let subjects = ds.subjects();
    let sessions = ds.sessions();
    let name = &ds.meta.name;
    let known_subject = |field: &str, items: &[String], p: &mut Vec<String>| {
        for s in items.iter().filter(|s| !subjects.contains(&s.as_str())) {
            p.push(format!(
                "{field}: unknown subject '{s}' (dataset '{name}' has {})",
                listing(&subjects)
            ));
        }
    };
    let known_session = |field: &str, items: &[String], p: &mut Vec<String>| {
        for s in items.iter().filter(|s| !sessions.contains(&s.as_str())) {
            p.push(format!(
                "{field}: unknown session '{s}' (dataset '{name}' has {})",
                listing(&sessions)
            ));
        }
    };
    let m = &cfg.manufacturer;
    known_subject("manufacturer.subjects", &m.subjects, p);
    known_session("manufacturer.sessions", &m.sessions, p);
    known_subject("pool.subjects", &cfg.pool.subjects, p);
    known_session("pool.sessions", &cfg.pool.sessions, p);
    known_subject("users.subjects", &cfg.users.subjects, p);
    known_session("users.session", std::slice::from_ref(&cfg.users.session), p);
    known_subject("presumed_test.subjects", &cfg.presumed_test.subjects, p);
    known_session("presumed_test.sessions", &cfg.presumed_test.sessions, p);
    let classes: Vec<&str> = ds.meta.classes.iter().map(String::as_str).collect();
    for c in m.classes.iter().filter(|c| !classes.contains(&c.as_str())) {
        p.push(format!(
            "manufacturer.classes: unknown class '{c}' (dataset '{name}' has {})",
            listing(&classes)
        ));
    }

    // Known subjects that have no recording in the sessions they are listed with.
    let has = |subject: &str, sessions: &[String]| {
        ds.recordings
            .iter()
            .any(|r| r.subject == subject && sessions.contains(&r.session))
    };
    let mut coverage = |field: &str, subs: &[String], sess: &[String]| {
        for s in subs {
            if subjects.contains(&s.as_str()) && !has(s, sess) {
                p.push(format!(
                    "{field}: subject '{s}' has no recording in session(s) {}",
                    sess.join(", ")
                ));
            }
        }
    };
    coverage("manufacturer.subjects", &m.subjects, &m.sessions);
    coverage("pool.subjects", &cfg.pool.subjects, &cfg.pool.sessions);
    coverage(
        "users.subjects",
        &cfg.users.subjects,
        std::slice::from_ref(&cfg.users.session),
    );
    coverage(
        "presumed_test.subjects",
        &cfg.presumed_test.subjects,
        &cfg.presumed_test.sessions,
    );

    let longest = ds.recordings.iter().map(|r| r.rows()).max().unwrap_or(0);
    if cfg.window.len > 0 && usize::try_from(cfg.window.len).is_ok_and(|l| l > longest) {
        p.push(format!(
            "window.len {} is longer than every recording (the longest has {longest} rows)",
            cfg.window.len
        ));
    }
}

/// Windows of one part of a split.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PartSummary {
    pub part: String,
    pub windows: usize,
    /// Per split class; empty for unlabelled parts (the pool).
    pub per_class: Vec<usize>,
}

/// What the CLI prints about a split.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SplitSummary {
    pub name: String,
    pub window: WindowSpec,
    pub classes: Vec<String>,
    pub num_presumed: usize,
    pub parts: Vec<PartSummary>,
}

impl fmt::Display for SplitSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "split {}: window {} stride {}, classes [{}] ({} presumed)",
            self.name,
            self.window.len(),
            self.window.stride(),
            self.classes.join(", "),
            self.num_presumed
        )?;
        let width = self
            .parts
            .iter()
            .map(|p| p.part.len())
            .max()
            .unwrap_or(4)
            .max(4);
        write!(f, "{:<width$} {:>8}", "part", "windows")?;
        for c in &self.classes {
            write!(f, " {c:>10}")?;
        }
        writeln!(f)?;
        for p in &self.parts {
            write!(f, "{:<width$} {:>8}", p.part, p.windows)?;
            for n in &p.per_class {
                write!(f, " {n:>10}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::dataset::{ChannelInfo, DatasetMeta, Recording};
    use std::path::PathBuf;

    // Dataset classes a=0, b=1, c=2, d=3.
    const A: Option<u16> = Some(0);
    const B: Option<u16> = Some(1);
    const C: Option<u16> = Some(2);
    const D: Option<u16> = Some(3);

    fn rec(id: &str, subject: &str, session: &str, runs: &[(Option<u16>, usize)]) -> Recording {
        let labels: Vec<Option<u16>> = runs
            .iter()
            .flat_map(|(l, n)| std::iter::repeat_n(*l, *n))
            .collect();
        let samples = (0..labels.len())
            .flat_map(|i| [i as f32 * 0.5 + subject.len() as f32, (i % 3) as f32])
            .collect();
        Recording {
            id: id.into(),
            subject: subject.into(),
            session: session.into(),
            file: format!("{id}.csv"),
            channels: 2,
            samples,
            labels,
        }
    }

    /// Manufacturer session pattern: a×8, unlabelled×2, b×8, c×8 (26 rows).
    fn session0(id: &str, subject: &str) -> Recording {
        rec(id, subject, "0", &[(A, 8), (None, 2), (B, 8), (C, 8)])
    }

    fn dataset() -> Dataset {
        let meta = DatasetMeta {
            name: "synthetic".into(),
            sample_rate_hz: 10.0,
            channels: vec![
                ChannelInfo {
                    name: "x".into(),
                    unit: "g".into(),
                },
                ChannelInfo {
                    name: "y".into(),
                    unit: "g".into(),
                },
            ],
            classes: vec!["a".into(), "b".into(), "c".into(), "d".into()],
            license: String::new(),
            source: String::new(),
        };
        let mut recs = Vec::new();
        for s in ["1", "2", "3", "4", "5"] {
            recs.push(session0(&format!("s{s}-0"), s));
        }
        for s in ["1", "2", "3"] {
            recs.push(rec(&format!("s{s}-1"), s, "1", &[(A, 8), (B, 8)]));
        }
        recs.push(rec("s4-1a", "4", "1", &[(D, 8), (A, 12)]));
        recs.push(rec("s4-1b", "4", "1", &[(A, 8), (B, 8)]));
        recs.push(rec("s5-1", "5", "1", &[(A, 10), (B, 10)]));
        Dataset::from_parts(meta, recs).unwrap()
    }

    const CONFIG: &str = r#"
        name = "synthetic"
        [window]
        len = 4
        stride = 2
        [manufacturer]
        subjects = [1, 2, "3"]
        sessions = [0]
        classes = ["b", "a"]
        validation_subjects = [3]
        [pool]
        subjects = [1, 2]
        sessions = ["1"]
        include_unlabelled = true
        [users]
        subjects = [4, 5]
        session = 1
        exclusive_fraction = 0.3
        [presumed_test]
        subjects = [4, 5]
        sessions = [0]
    "#;

    fn config() -> SplitConfig {
        SplitConfig::from_toml_str(CONFIG).unwrap()
    }

    fn starts(ds: &Dataset, set: &WindowSet) -> Vec<(String, usize)> {
        set.refs
            .iter()
            .map(|w| (ds.recordings[w.recording].id.clone(), w.start))
            .collect()
    }

    fn problems_of(cfg: &SplitConfig) -> Vec<String> {
        Split::build(cfg, &dataset()).unwrap_err().problems
    }

    fn has(problems: &[String], needle: &str) -> bool {
        problems.iter().any(|p| p.contains(needle))
    }

    #[test]
    fn integer_and_string_ids_are_normalised_to_strings() {
        let cfg = config();
        assert_eq!(cfg.manufacturer.subjects, vec!["1", "2", "3"]);
        assert_eq!(cfg.manufacturer.sessions, vec!["0"]);
        assert_eq!(cfg.users.session, "1");
        assert!(cfg.check().is_empty(), "{:?}", cfg.check());
    }

    #[test]
    fn unknown_keys_and_non_id_values_are_rejected() {
        let typo = CONFIG.replace("exclusive_fraction", "exclusive_fractoin");
        let err = SplitConfig::from_toml_str(&typo).unwrap_err();
        assert!(has(&err.problems, "exclusive_fractoin"), "{err}");
        let float_id = CONFIG.replace(
            "subjects = [4, 5]\n        session",
            "subjects = [4.5]\n        session",
        );
        assert!(SplitConfig::from_toml_str(&float_id).is_err());
    }

    #[test]
    fn unknown_subject_is_reported_with_the_known_ones() {
        let mut cfg = config();
        cfg.users.subjects.push("99".into());
        let problems = problems_of(&cfg);
        assert!(
            has(
                &problems,
                "users.subjects: unknown subject '99' (dataset 'synthetic' has 1, 2, 3, 4, 5)"
            ),
            "{problems:?}"
        );
    }

    #[test]
    fn overlapping_user_portions_are_rejected() {
        let mut cfg = config();
        cfg.users.subjects = vec!["4".into(), "5".into(), "4".into()];
        let problems = problems_of(&cfg);
        assert!(
            has(&problems, "subject '4' is listed twice"),
            "{problems:?}"
        );
    }

    #[test]
    fn all_problems_are_reported_together() {
        let mut cfg = config();
        cfg.manufacturer.subjects.push("4".into()); // also a user
        cfg.manufacturer.sessions.push("7".into()); // unknown session
        cfg.manufacturer.classes.push("jump".into()); // unknown class
        cfg.manufacturer.validation_subjects = vec!["5".into()]; // not a manufacturer subject
        cfg.users.exclusive_fraction = 1.0;
        cfg.presumed_test.subjects.push("1".into()); // training subject in the test
        cfg.window.stride = 0;
        let err = Split::build(&cfg, &dataset()).unwrap_err();
        let p = &err.problems;
        for needle in [
            "subject '4' is both a manufacturer subject and a user",
            "unknown session '7'",
            "unknown class 'jump'",
            "subject '5' is not in manufacturer.subjects",
            "exclusive_fraction must be strictly between 0 and 1, found 1",
            "subject '1' is a manufacturer subject",
            "window.stride must be at least 1, found 0",
        ] {
            assert!(has(p, needle), "missing {needle:?} in {p:?}");
        }
        assert!(err.to_string().starts_with(&format!(
            "invalid split configuration ({} problems)",
            p.len()
        )));
    }

    #[test]
    fn window_longer_than_every_recording_is_rejected() {
        let mut cfg = config();
        cfg.window.len = 27;
        assert!(has(
            &problems_of(&cfg),
            "longer than every recording (the longest has 26 rows)"
        ));
    }

    #[test]
    fn empty_sets_and_leaks_into_the_pool_are_rejected() {
        let mut cfg = config();
        cfg.manufacturer.validation_subjects.clear();
        cfg.pool = PoolConfig::default();
        let p = problems_of(&cfg);
        assert!(has(&p, "validation_subjects must not be empty"), "{p:?}");
        assert!(has(&p, "the pool is empty"), "{p:?}");

        let mut cfg = config();
        cfg.pool.subjects = vec!["3".into(), "4".into()];
        cfg.pool.sessions = vec!["0".into(), "1".into()];
        let p = problems_of(&cfg);
        assert!(has(&p, "subject '3' is a validation subject"), "{p:?}");
        assert!(has(&p, "subject '4' is also a user"), "{p:?}");

        let mut cfg = config();
        cfg.pool.sessions = vec!["0".into()];
        assert!(has(
            &problems_of(&cfg),
            "subject '1' session '0' is already manufacturer training data"
        ));
    }

    #[test]
    fn parts_without_windows_are_rejected() {
        // Runs of 8 rows hold no window of 9: subject 3 has none. User 4 has two `a`
        // windows (s4-1a 8 and 10), one exclusive, the other overlaps it: no test window.
        let mut cfg = config();
        cfg.window.len = 9;
        let p = problems_of(&cfg);
        assert!(has(&p, "presumed_val has no windows of length 9"), "{p:?}");
        assert!(has(&p, "user '4' test set has no windows"), "{p:?}");
        assert!(!has(&p, "user '4' exclusive"), "{p:?}");
    }

    #[test]
    fn presumed_parts_hold_presumed_classes_of_their_subjects() {
        let ds = dataset();
        let split = Split::build(&config(), &ds).unwrap();
        assert_eq!(split.classes, vec!["b", "a", "d"]);
        assert_eq!(split.num_presumed, 2);
        // Per 26-row session-0 recording: a at 0,2,4 and b at 10,12,14.
        let train = starts(&ds, &split.presumed_train);
        assert_eq!(train.len(), 12);
        assert!(train.iter().all(|(id, _)| id == "s1-0" || id == "s2-0"));
        assert_eq!(&split.presumed_train.y[..6], &[1, 1, 1, 0, 0, 0]);
        assert_eq!(
            starts(&ds, &split.presumed_val),
            [0, 2, 4, 10, 12, 14]
                .map(|s| ("s3-0".to_string(), s))
                .to_vec()
        );
        let test = starts(&ds, &split.presumed_test);
        assert_eq!(test.len(), 12);
        assert!(test.iter().all(|(id, _)| id == "s4-0" || id == "s5-0"));
        assert!(split.presumed_test.y.iter().all(|&y| y < 2));
    }

    #[test]
    fn pool_holds_pool_sessions_and_unpresumed_manufacturer_windows() {
        let ds = dataset();
        let split = Split::build(&config(), &ds).unwrap();
        assert!(!split.pool.is_labelled());
        let pool = starts(&ds, &split.pool);
        // Per training subject: session 0 windows 6, 8, 16 (mixed) and 18, 20, 22 (c);
        // session 1 (16 rows): 7 windows. Validation subject 3 stays out.
        let s1_0: Vec<usize> = pool
            .iter()
            .filter(|(id, _)| id == "s1-0")
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(s1_0, vec![6, 8, 16, 18, 20, 22]);
        assert_eq!(pool.iter().filter(|(id, _)| id == "s2-1").count(), 7);
        assert_eq!(pool.len(), 26);
        assert!(pool
            .iter()
            .all(|(id, _)| !id.starts_with("s3") && !id.starts_with("s4")));
    }

    #[test]
    fn user_exclusive_takes_the_first_fraction_of_each_class_and_test_avoids_its_rows() {
        let ds = dataset();
        let split = Split::build(&config(), &ds).unwrap();
        let u4 = &split.users[0];
        assert_eq!(u4.subject, "4");
        // s4-1a: d windows 0,2,4; a windows 8..=16. s4-1b: a windows 0,2,4; b windows 8,10,12.
        // d: ceil(0.3·3) = 1, a: ceil(0.3·8) = 3, b: ceil(0.3·3) = 1.
        let s = |id: &str, start: usize| (id.to_string(), start);
        assert_eq!(
            starts(&ds, &u4.exclusive),
            vec![
                s("s4-1a", 0),
                s("s4-1a", 8),
                s("s4-1a", 10),
                s("s4-1a", 12),
                s("s4-1b", 8)
            ]
        );
        assert_eq!(u4.exclusive.y, vec![2, 1, 1, 1, 0]);
        // Dropped for sharing rows: s4-1a 2 (with 0), 14 (with 12); s4-1b 10 (with 8).
        assert_eq!(
            starts(&ds, &u4.test),
            vec![
                s("s4-1a", 4),
                s("s4-1a", 16),
                s("s4-1b", 0),
                s("s4-1b", 2),
                s("s4-1b", 4),
                s("s4-1b", 12)
            ]
        );
        assert_eq!(u4.test.y, vec![2, 1, 1, 1, 1, 0]);
        // s5-1: a windows 0,2,4,6, b windows 10..=16; ceil(0.3·4) = 2 each.
        let u5 = &split.users[1];
        assert_eq!(
            starts(&ds, &u5.exclusive),
            vec![s("s5-1", 0), s("s5-1", 2), s("s5-1", 10), s("s5-1", 12)]
        );
        assert_eq!(starts(&ds, &u5.test), vec![s("s5-1", 6), s("s5-1", 16)]);
    }

    #[test]
    fn standardizer_is_fitted_on_presumed_train_only() {
        let ds = dataset();
        let split = Split::build(&config(), &ds).unwrap();
        let expected = Standardizer::fit(&ds.recordings, &split.presumed_train.refs, 4).unwrap();
        assert_eq!(split.standardizer, expected);
        let w = split.pool.refs[0];
        let raw = ds.recordings[w.recording].row(w.start)[0];
        let got = split.pool.window(0)[0];
        assert!((got - (raw - expected.mean[0]) / expected.std[0]).abs() < 1e-6);
        let summary = split.summary();
        let train = &summary.parts[0];
        assert_eq!((train.part.as_str(), train.windows), ("presumed_train", 12));
        assert_eq!(train.per_class, vec![6, 6, 0]);
        let excl = summary
            .parts
            .iter()
            .find(|p| p.part == "users exclusive")
            .unwrap();
        assert_eq!((excl.windows, excl.per_class.clone()), (9, vec![3, 5, 1]));
        assert!(summary.to_string().contains("user 4 test"));
    }

    fn repo_file(relative: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(relative)
    }

    #[test]
    fn shipped_hapt_split_config_parses_and_is_consistent() {
        let cfg = SplitConfig::from_file(&repo_file("cloud-worker/splits/hapt.toml")).unwrap();
        assert_eq!(cfg.check(), Vec::<String>::new());
        assert_eq!(
            cfg.manufacturer.subjects.len() + cfg.users.subjects.len(),
            30
        );
    }

    /// `$DIREDI_DATA_DIR/hapt`, else `<repo>/data/hapt`. `None` (skip) if it is missing,
    /// unless `DIREDI_REQUIRE_DATA` is set.
    fn hapt_dir() -> Option<PathBuf> {
        let dir = match std::env::var_os("DIREDI_DATA_DIR") {
            Some(d) => PathBuf::from(d).join("hapt"),
            None => repo_file("data/hapt"),
        };
        if dir.join("dataset.json").is_file() {
            return Some(dir);
        }
        assert!(
            std::env::var_os("DIREDI_REQUIRE_DATA").is_none(),
            "DIREDI_REQUIRE_DATA is set but {} has no dataset.json (run scripts/fetch-hapt.sh)",
            dir.display()
        );
        eprintln!(
            "skipping: no dataset at {} (run scripts/fetch-hapt.sh; set DIREDI_REQUIRE_DATA to fail instead)",
            dir.display()
        );
        None
    }

    #[test]
    fn hapt_split_keeps_manufacturer_users_and_test_apart() {
        let Some(dir) = hapt_dir() else { return };
        let started = std::time::Instant::now();
        let ds = Dataset::load(&dir).unwrap();
        let load_time = started.elapsed();
        let cfg = SplitConfig::from_file(&repo_file("cloud-worker/splits/hapt.toml")).unwrap();
        let started = std::time::Instant::now();
        let split = Split::build(&cfg, &ds).unwrap();
        eprintln!(
            "hapt: loaded {} rows in {load_time:.2?}, split built in {:.2?}\n{}",
            ds.rows(),
            started.elapsed(),
            split.summary()
        );
        let len = split.window.len();
        let subject = |w: &WindowRef| ds.recordings[w.recording].subject.as_str();
        let session = |w: &WindowRef| ds.recordings[w.recording].session.as_str();
        let users: HashSet<&str> = cfg.users.subjects.iter().map(String::as_str).collect();
        let manufacturer: HashSet<&str> = cfg
            .manufacturer
            .subjects
            .iter()
            .map(String::as_str)
            .collect();

        for set in [&split.presumed_train, &split.presumed_val, &split.pool] {
            assert!(set.refs.iter().all(|w| !users.contains(subject(w))));
        }
        for set in [
            &split.presumed_train,
            &split.presumed_val,
            &split.presumed_test,
        ] {
            assert!(set.y.iter().all(|&y| (y as usize) < split.num_presumed));
            for (w, &y) in set.refs.iter().zip(&set.y) {
                let label = w.label.map(|c| ds.meta.classes[usize::from(c)].as_str());
                assert_eq!(label, Some(split.classes[y as usize].as_str()));
            }
        }
        assert!(split.presumed_val.refs.iter().all(|w| cfg
            .manufacturer
            .validation_subjects
            .iter()
            .any(|v| v == subject(w))));
        assert!(split.presumed_train.refs.iter().all(|w| !cfg
            .manufacturer
            .validation_subjects
            .iter()
            .any(|v| v == subject(w))));
        assert!(split
            .presumed_test
            .refs
            .iter()
            .all(|w| !manufacturer.contains(subject(w))));
        assert!(split.presumed_train.refs.iter().all(|w| session(w) == "0"));

        for user in &split.users {
            let in_session: HashSet<u16> = ds
                .recordings
                .iter()
                .enumerate()
                .filter(|(_, r)| r.subject == user.subject && r.session == cfg.users.session)
                .flat_map(|(i, r)| windows(i, r, split.window))
                .filter_map(|w| w.label)
                .collect();
            let exclusive: HashSet<u16> =
                user.exclusive.refs.iter().filter_map(|w| w.label).collect();
            assert_eq!(exclusive, in_session, "user {}", user.subject);
            for t in &user.test.refs {
                assert_eq!(subject(t), user.subject);
                assert!(user.exclusive.refs.iter().all(|e| !e.overlaps(t, len)));
            }
            assert!(user
                .exclusive
                .refs
                .iter()
                .all(|w| subject(w) == user.subject));
        }
        // Standardised training data: mean ≈ 0 and std ≈ 1 per channel (not exact, since
        // overlapping rows count twice here but once in the fit).
        let t = &split.presumed_train;
        for c in 0..t.channels {
            let values: Vec<f64> = (0..t.n())
                .flat_map(|i| t.window(i)[c * t.len..(c + 1) * t.len].to_vec())
                .map(f64::from)
                .collect();
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
            assert!(
                mean.abs() < 0.05 && (var.sqrt() - 1.0).abs() < 0.05,
                "channel {c}: {mean} {var}"
            );
        }
    }
}
