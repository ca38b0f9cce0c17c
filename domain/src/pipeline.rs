//! Pipeline definitions and their resolution.
//!
//! Pipelines are configuration: a TOML table maps every phase to the phases it depends on.
//! [`PipelineCatalog::from_toml`] refuses unknown names and cycles, so a catalog that exists is
//! valid; [`PipelineCatalog::resolve`] is a pure function from a requested phase and what is
//! already done to the ordered steps to run.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::values::Phase;

/// The default pipeline definitions shipped with essayflow.
pub const DEFAULT_PIPELINES_TOML: &str = include_str!("../../config/pipelines.toml");

/// Why a pipeline file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error("pipeline file is not valid TOML: {0}")]
    Syntax(String),
    #[error("pipeline file defines no pipelines")]
    Empty,
    #[error("pipeline name {name:?} is invalid: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("pipeline {pipeline:?} depends on unknown pipeline {unknown:?}")]
    UnknownDependency { pipeline: String, unknown: String },
    #[error("pipelines form a cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
}

/// Why a requested pipeline could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("unknown pipeline {0}")]
    UnknownPipeline(Phase),
}

/// The steps to run for one request, in dependency order, and the prerequisites skipped
/// because they already succeeded for every essay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub steps: Vec<Phase>,
    pub pruned: Vec<Phase>,
}

/// A validated, acyclic set of pipeline definitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineCatalog {
    dependencies: BTreeMap<Phase, Vec<Phase>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineFile {
    pipelines: BTreeMap<String, Vec<String>>,
}

impl PipelineCatalog {
    /// Parses and validates a pipeline file (see `config/pipelines.toml`).
    pub fn from_toml(source: &str) -> Result<Self, CatalogError> {
        let file: PipelineFile =
            toml::from_str(source).map_err(|e| CatalogError::Syntax(e.message().to_owned()))?;
        Self::from_definitions(file.pipelines)
    }

    /// Validates definitions given as plain names: phase -> prerequisites.
    pub fn from_definitions(
        definitions: BTreeMap<String, Vec<String>>,
    ) -> Result<Self, CatalogError> {
        if definitions.is_empty() {
            return Err(CatalogError::Empty);
        }
        let parse = |name: &str| {
            Phase::parse(name).map_err(|e| CatalogError::InvalidName {
                name: name.to_owned(),
                reason: e.reason,
            })
        };
        let mut dependencies = BTreeMap::new();
        for (name, deps) in &definitions {
            let phase = parse(name)?;
            let mut parsed = Vec::with_capacity(deps.len());
            for dep in deps {
                if !definitions.contains_key(dep) {
                    return Err(CatalogError::UnknownDependency {
                        pipeline: name.clone(),
                        unknown: dep.clone(),
                    });
                }
                parsed.push(parse(dep)?);
            }
            dependencies.insert(phase, parsed);
        }
        let catalog = Self { dependencies };
        catalog.check_acyclic()?;
        Ok(catalog)
    }

    /// The catalog of [`DEFAULT_PIPELINES_TOML`].
    pub fn builtin() -> Self {
        Self::from_toml(DEFAULT_PIPELINES_TOML)
            .unwrap_or_else(|e| panic!("the built-in pipeline file is invalid: {e}"))
    }

    pub fn contains(&self, phase: &Phase) -> bool {
        self.dependencies.contains_key(phase)
    }

    /// Every defined phase, in name order.
    pub fn phases(&self) -> impl Iterator<Item = &Phase> {
        self.dependencies.keys()
    }

    /// The direct prerequisites of a phase, as configured.
    pub fn prerequisites(&self, phase: &Phase) -> Option<&[Phase]> {
        self.dependencies.get(phase).map(Vec::as_slice)
    }

    /// Resolves `requested` into the ordered steps to run.
    ///
    /// Prerequisites come first, depth first in the order they are listed, each once. A
    /// prerequisite for which `done_for_every_essay` answers true is pruned; the requested phase
    /// itself always runs, so asking again re-runs it.
    pub fn resolve(
        &self,
        requested: &Phase,
        done_for_every_essay: impl Fn(&Phase) -> bool,
    ) -> Result<Resolution, ResolveError> {
        if !self.contains(requested) {
            return Err(ResolveError::UnknownPipeline(requested.clone()));
        }
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        self.visit(requested, &mut seen, &mut order);
        let (pruned, steps): (Vec<Phase>, Vec<Phase>) = order
            .into_iter()
            .partition(|phase| phase != requested && done_for_every_essay(phase));
        Ok(Resolution { steps, pruned })
    }

    fn visit(&self, phase: &Phase, seen: &mut BTreeSet<Phase>, order: &mut Vec<Phase>) {
        if !seen.insert(phase.clone()) {
            return;
        }
        for dep in self.dependencies.get(phase).into_iter().flatten() {
            self.visit(dep, seen, order);
        }
        order.push(phase.clone());
    }

    fn check_acyclic(&self) -> Result<(), CatalogError> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            Visiting,
            Done,
        }
        fn walk<'a>(
            catalog: &'a PipelineCatalog,
            phase: &'a Phase,
            marks: &mut BTreeMap<&'a Phase, Mark>,
            path: &mut Vec<&'a Phase>,
        ) -> Result<(), CatalogError> {
            match marks.get(phase) {
                Some(Mark::Done) => return Ok(()),
                Some(Mark::Visiting) => {
                    let start = path.iter().position(|p| *p == phase).unwrap_or(0);
                    let mut cycle: Vec<String> =
                        path[start..].iter().map(|p| p.to_string()).collect();
                    cycle.push(phase.to_string());
                    return Err(CatalogError::Cycle(cycle));
                }
                None => {}
            }
            marks.insert(phase, Mark::Visiting);
            path.push(phase);
            for dep in &catalog.dependencies[phase] {
                walk(catalog, dep, marks, path)?;
            }
            path.pop();
            marks.insert(phase, Mark::Done);
            Ok(())
        }
        let mut marks = BTreeMap::new();
        for phase in self.dependencies.keys() {
            walk(self, phase, &mut marks, &mut Vec::new())?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn phase(name: &str) -> Phase {
        Phase::parse(name).unwrap()
    }

    fn names(phases: &[Phase]) -> Vec<&str> {
        phases.iter().map(Phase::as_str).collect()
    }

    #[test]
    fn ai_feedback_resolves_to_spellcheck_nlp_ai_feedback_in_that_order() {
        let resolution = PipelineCatalog::builtin()
            .resolve(&phase("ai_feedback"), |_| false)
            .unwrap();
        assert_eq!(
            names(&resolution.steps),
            ["spellcheck", "nlp", "ai_feedback"]
        );
        assert!(resolution.pruned.is_empty());
    }

    #[test]
    fn prerequisites_done_for_every_essay_are_pruned_but_the_requested_phase_runs_again() {
        let resolution = PipelineCatalog::builtin()
            .resolve(&phase("ai_feedback"), |p| p.as_str() != "cj_assessment")
            .unwrap();
        assert_eq!(names(&resolution.steps), ["ai_feedback"]);
        assert_eq!(names(&resolution.pruned), ["spellcheck", "nlp"]);
    }

    #[test]
    fn an_unknown_pipeline_is_not_resolved() {
        let err = PipelineCatalog::builtin()
            .resolve(&phase("translation"), |_| false)
            .unwrap_err();
        assert_eq!(err, ResolveError::UnknownPipeline(phase("translation")));
    }

    #[test]
    fn a_cycle_is_refused_with_its_path() {
        let err =
            PipelineCatalog::from_toml("[pipelines]\na = [\"b\"]\nb = [\"c\"]\nc = [\"a\"]\n")
                .unwrap_err();
        assert_eq!(
            err,
            CatalogError::Cycle(vec!["a".into(), "b".into(), "c".into(), "a".into()])
        );
        assert_eq!(err.to_string(), "pipelines form a cycle: a -> b -> c -> a");
    }

    #[test]
    fn a_self_dependency_is_a_cycle() {
        let err = PipelineCatalog::from_toml("[pipelines]\na = [\"a\"]\n").unwrap_err();
        assert!(matches!(err, CatalogError::Cycle(_)));
    }

    #[test]
    fn an_unknown_dependency_is_refused() {
        let err = PipelineCatalog::from_toml("[pipelines]\nnlp = [\"spelling\"]\n").unwrap_err();
        assert_eq!(
            err,
            CatalogError::UnknownDependency {
                pipeline: "nlp".into(),
                unknown: "spelling".into()
            }
        );
    }

    #[test]
    fn an_invalid_name_and_an_empty_file_are_refused() {
        assert!(matches!(
            PipelineCatalog::from_toml("[pipelines]\n\"Spell Check\" = []\n"),
            Err(CatalogError::InvalidName { .. })
        ));
        assert_eq!(
            PipelineCatalog::from_toml("[pipelines]\n"),
            Err(CatalogError::Empty)
        );
        assert!(matches!(
            PipelineCatalog::from_toml("pipelines = 3"),
            Err(CatalogError::Syntax(_))
        ));
    }

    /// Random acyclic catalogs: phase `pN` may depend only on phases with a smaller index.
    fn acyclic_catalog() -> impl Strategy<Value = PipelineCatalog> {
        (1usize..8)
            .prop_flat_map(|n| {
                let deps: Vec<_> = (0..n)
                    .map(|i| proptest::collection::vec(0..i.max(1), 0..=i.min(3)))
                    .collect();
                deps
            })
            .prop_map(|deps| {
                let definitions = deps
                    .iter()
                    .enumerate()
                    .map(|(i, ds)| {
                        let ds = ds
                            .iter()
                            .filter(|d| **d < i)
                            .map(|d| format!("p{d}"))
                            .collect();
                        (format!("p{i}"), ds)
                    })
                    .collect();
                PipelineCatalog::from_definitions(definitions).unwrap()
            })
    }

    proptest! {
        #[test]
        fn resolution_runs_every_unpruned_prerequisite_once_after_its_own_prerequisites(
            catalog in acyclic_catalog(),
            pick in any::<prop::sample::Index>(),
            done_mask in any::<u16>(),
        ) {
            let phases: Vec<Phase> = catalog.phases().cloned().collect();
            let requested = pick.get(&phases).clone();
            let done = |p: &Phase| {
                let i: usize = p.as_str()[1..].parse().unwrap();
                done_mask & (1 << i) != 0
            };
            let resolution = catalog.resolve(&requested, done).unwrap();

            // The requested phase always runs, and last.
            prop_assert_eq!(resolution.steps.last(), Some(&requested));
            // Every step appears once, and steps and pruned do not overlap.
            let all: BTreeSet<_> = resolution.steps.iter().chain(&resolution.pruned).collect();
            prop_assert_eq!(all.len(), resolution.steps.len() + resolution.pruned.len());
            // Pruned steps are exactly the prerequisites already done.
            for p in &resolution.pruned {
                prop_assert!(done(p) && *p != requested);
            }
            for p in &resolution.steps {
                prop_assert!(*p == requested || !done(p));
            }
            // Every step comes after each of its prerequisites that runs.
            for (i, step) in resolution.steps.iter().enumerate() {
                for dep in catalog.prerequisites(step).unwrap() {
                    if let Some(j) = resolution.steps.iter().position(|s| s == dep) {
                        prop_assert!(j < i, "{} runs before its prerequisite {}", step, dep);
                    }
                }
            }
            // Together they are exactly the transitive closure of the request.
            let mut closure = BTreeSet::new();
            let mut stack = vec![requested.clone()];
            while let Some(p) = stack.pop() {
                if closure.insert(p.clone()) {
                    stack.extend(catalog.prerequisites(&p).unwrap().iter().cloned());
                }
            }
            prop_assert_eq!(all, closure.iter().collect());
        }
    }
}
