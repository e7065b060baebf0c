//! Where the stars of an evaluation come from: a split of the run's own data, or any labelled set
//! on its pixel grid, loaded and checked against the run.

use std::path::{Path, PathBuf};

use starflow_data::{Dataset, FluxTransform, LoadOptions};
use starflow_training::error::{Result, TrainError};
use starflow_training::run::{RunDir, RunState};
use starflow_training::train::{prepare_data, Prepared, Quiet};

use crate::metrics::DataFiles;

/// Where the stars of an evaluation come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EvalSource {
    /// A split (`train`, `val` or `test`) of the data the run was trained on.
    Split(String),
    /// Any labelled data set on the run's pixel grid (every row is evaluated), such as a
    /// synthetic set drawn with a seed never used in training.
    Files { spectra: PathBuf, labels: PathBuf },
}

impl EvalSource {
    /// `spectra.npy` and `labels.npy` in a directory.
    pub fn dir(dir: &Path) -> Self {
        EvalSource::Files {
            spectra: dir.join("spectra.npy"),
            labels: dir.join("labels.npy"),
        }
    }

    /// Checks, in milliseconds, what can be checked without loading the stars: that the split is
    /// one of `train`, `val`, `test`, or that both files open as npy arrays. Callers that fit a
    /// recalibration first (minutes) call this before, so a typo fails at once.
    pub fn check_quickly(&self, run_dir: &Path) -> Result<()> {
        match self {
            EvalSource::Split(s) if !SPLITS.contains(&s.as_str()) => Err(unknown_split(s, run_dir)),
            EvalSource::Split(_) => Ok(()),
            EvalSource::Files { spectra, labels } => {
                starflow_data::npy::NpyArray::open(spectra)?;
                starflow_data::npy::NpyArray::open(labels)?;
                Ok(())
            }
        }
    }

    /// The name evaluations carry: the split, or `data` for other files.
    pub fn name(&self) -> &str {
        match self {
            EvalSource::Split(s) => s,
            EvalSource::Files { .. } => "data",
        }
    }

    /// The files of a labelled set as absolute paths (as given where they cannot be resolved),
    /// which [`crate::Evaluation::data`] records; `None` for a split of the run's own data.
    pub fn data_files(&self) -> Option<DataFiles> {
        let EvalSource::Files { spectra, labels } = self else {
            return None;
        };
        let absolute = |p: &Path| {
            std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.to_path_buf())
                .display()
                .to_string()
        };
        Some(DataFiles {
            spectra: absolute(spectra),
            labels: absolute(labels),
        })
    }

    /// The name of this source's default output folder inside a run, `eval-<this>`: the split, or
    /// for other files `data-` and the name of the spectra's directory (of the spectra file
    /// itself when it is not called `spectra.npy`), so that evaluations of two held-out sets
    /// land side by side instead of one replacing the other.
    pub fn folder_name(&self) -> String {
        let EvalSource::Files { spectra, .. } = self else {
            return self.name().to_string();
        };
        let path = std::fs::canonicalize(spectra).unwrap_or_else(|_| spectra.clone());
        let named = if path.file_name().is_some_and(|f| f == "spectra.npy") {
            path.parent().and_then(Path::file_name)
        } else {
            path.file_stem()
        };
        let tag: String = named
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        match tag.as_str() {
            "" => "data".to_string(),
            _ => format!("data-{tag}"),
        }
    }

    /// What an earlier evaluation in `dir` (its `metrics.json`) was of, when that was not this
    /// source: a split of the run's data, or other files. `None` when `dir` holds no evaluation,
    /// or one of the same stars, which a new evaluation may replace (the run recalibrated, say).
    /// An evaluation of files written before the files were recorded, or a `metrics.json` that
    /// cannot be read, counts as other stars: nothing says they were these.
    pub fn other_evaluation_in(&self, dir: &Path) -> Option<String> {
        let path = dir.join("metrics.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                return Some(format!(
                    "an evaluation whose metrics.json cannot be read ({e})"
                ))
            }
        };
        let Ok(saved) = serde_json::from_str::<SavedSource>(&text) else {
            return Some("an evaluation whose metrics.json cannot be parsed".into());
        };
        let same = match (self, &saved.data) {
            (EvalSource::Split(s), None) => *s == saved.split,
            (EvalSource::Files { .. }, Some(files)) => self.data_files().as_ref() == Some(files),
            _ => false,
        };
        (!same).then(|| match saved.data {
            Some(f) => format!("the evaluation of {} and {}", f.spectra, f.labels),
            None if saved.split == "data" => {
                "an evaluation of other files (which ones was not recorded)".into()
            }
            None => format!("the evaluation of the run's {} split", saved.split),
        })
    }
}

/// What [`EvalSource::other_evaluation_in`] reads of a saved `metrics.json`.
#[derive(serde::Deserialize)]
struct SavedSource {
    split: String,
    #[serde(default)]
    data: Option<DataFiles>,
}

/// The stars of `source` for a run: the data set, its flux transform, the rows to evaluate and
/// the directory where the generator's bound files (`crlb.npy`) would be.
pub struct SourceRows {
    pub dataset: Dataset,
    pub flux: FluxTransform,
    pub indices: Vec<usize>,
    pub data_dir: PathBuf,
}

/// Loads the stars of `source` for the run in `run_dir` (whose state is `state`), refusing data
/// whose pixel count differs from what the run was trained on.
pub fn source_rows(run_dir: &Path, state: &RunState, source: &EvalSource) -> Result<SourceRows> {
    let rows = match source {
        EvalSource::Split(split) => {
            let data = prepare_data(&state.config, &Quiet)?;
            let indices = split_indices(&data, split, run_dir)?;
            SourceRows {
                dataset: data.dataset,
                flux: data.flux,
                indices,
                data_dir: state.config.data.dir.clone(),
            }
        }
        EvalSource::Files { spectra, labels } => {
            let d = &state.config.data;
            let opts = LoadOptions {
                label_names: d.label_names.clone(),
                targets: d.targets.clone(),
                drop_nonfinite: d.drop_nonfinite,
            };
            let dataset = Dataset::load_npy(spectra, labels, &opts)?;
            SourceRows {
                indices: (0..dataset.len()).collect(),
                dataset,
                flux: FluxTransform::new(state.flux_floor)?,
                data_dir: spectra.parent().unwrap_or(Path::new(".")).to_path_buf(),
            }
        }
    };
    if rows.dataset.n_pix() != state.n_pix {
        return Err(TrainError::Input {
            path: rows.dataset.paths().0.to_path_buf(),
            problem: format!(
                "the spectra have {} pixels, but the run in {} was trained on {} pixels",
                rows.dataset.n_pix(),
                run_dir.display(),
                state.n_pix
            ),
            fix: match source {
                EvalSource::Split(_) => {
                    "evaluate with the data the run was trained on (data.dir in its config.toml)"
                        .into()
                }
                EvalSource::Files { .. } => {
                    "pass spectra on the wavelength grid the run was trained on".into()
                }
            },
        });
    }
    if let EvalSource::Split(_) = source {
        let (spectra, labels) = rows.dataset.paths();
        state.check_data(
            &RunDir::new(run_dir),
            spectra,
            labels,
            "restore the data the run was trained on (data.dir in its config.toml), or evaluate these files with --data, which makes no claim about splits",
        )?;
    }
    if rows.indices.is_empty() {
        return Err(TrainError::config(
            run_dir,
            format!("no stars to evaluate in {}", source.name()),
        ));
    }
    Ok(rows)
}

/// The rows of the data files (0-based, as in `spectra.npy`) that make up `split` (`train`, `val` or
/// `test`) of the run in `run_dir`, in the split's order. For tools outside starflow that must see
/// the same stars: a classical baseline fitted on the run's training stars, say. The data files are
/// checked against the run's fingerprint, as for an evaluation of the split.
pub fn split_file_rows(run_dir: &Path, split: &str) -> Result<Vec<usize>> {
    let source = EvalSource::Split(split.to_string());
    source.check_quickly(run_dir)?;
    let state = RunDir::new(run_dir).load_state()?;
    let rows = source_rows(run_dir, &state, &source)?;
    Ok(rows
        .indices
        .iter()
        .map(|&i| rows.dataset.file_row(i))
        .collect())
}

/// The rows of a named split.
fn split_indices(data: &Prepared, split: &str, run_dir: &Path) -> Result<Vec<usize>> {
    match split {
        "train" => Ok(data.split.train.clone()),
        "val" => Ok(data.split.val.clone()),
        "test" => Ok(data.split.test.clone()),
        other => Err(unknown_split(other, run_dir)),
    }
}

/// The splits a run's data are divided into, by name.
const SPLITS: [&str; 3] = ["train", "val", "test"];

/// The error for a split name that is none of [`SPLITS`].
fn unknown_split(name: &str, run_dir: &Path) -> TrainError {
    TrainError::config(
        run_dir,
        format!("unknown split `{name}`; use train, val or test"),
    )
}

/// Each evaluated star's signal-to-noise, from the data's `SNR` label column (GALAH's layout), in
/// the order of `indices`; `None` when the data have no such column.
pub(crate) fn star_snr(dataset: &Dataset, indices: &[usize]) -> Option<Vec<f64>> {
    let column = dataset.column("SNR")?;
    Some(indices.iter().map(|&i| column[i]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(spectra: &Path) -> EvalSource {
        EvalSource::Files {
            spectra: spectra.to_path_buf(),
            labels: spectra.with_file_name("labels.npy"),
        }
    }

    #[test]
    fn folders_are_named_after_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let held = dir.path().join("held out #2");
        std::fs::create_dir(&held).unwrap();
        std::fs::write(held.join("spectra.npy"), b"").unwrap();
        assert_eq!(EvalSource::dir(&held).folder_name(), "data-held_out__2");
        assert_eq!(
            files(&held.join("survey-a.npy")).folder_name(),
            "data-survey-a"
        );
        assert_eq!(EvalSource::Split("val".into()).folder_name(), "val");
    }

    #[test]
    fn only_an_evaluation_of_the_same_stars_may_be_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("eval");
        let a = files(&dir.path().join("a.npy"));
        let b = files(&dir.path().join("b.npy"));
        let test = EvalSource::Split("test".into());
        assert_eq!(a.other_evaluation_in(&out), None, "nothing there yet");
        std::fs::create_dir(&out).unwrap();
        let save = |split: &str, data: Option<DataFiles>| {
            let json = serde_json::json!({ "split": split, "data": data });
            std::fs::write(out.join("metrics.json"), json.to_string()).unwrap();
        };
        save("data", a.data_files());
        assert_eq!(a.other_evaluation_in(&out), None);
        let other = b.other_evaluation_in(&out).unwrap();
        assert!(other.contains("a.npy"), "{other}");
        assert!(test.other_evaluation_in(&out).is_some());
        save("test", None);
        assert_eq!(test.other_evaluation_in(&out), None);
        assert!(EvalSource::Split("val".into())
            .other_evaluation_in(&out)
            .unwrap()
            .contains("test split"));
        assert!(a.other_evaluation_in(&out).is_some());
        // Written before the files were recorded: nothing says they were these.
        save("data", None);
        assert!(a
            .other_evaluation_in(&out)
            .unwrap()
            .contains("not recorded"));
        std::fs::write(out.join("metrics.json"), "{").unwrap();
        assert!(a.other_evaluation_in(&out).is_some());
    }
}
