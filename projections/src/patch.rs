//! Building the JSON Patch (RFC 6902) of a live change from what a page changed.
//!
//! A change's patch turns the topic's document at version N-1 into the document at version N.
//! Its cost follows what the page changed, never the size of the document: the small parts of
//! a view (a batch's summary, a dashboard's totals) are diffed whole with [`json_patch::diff`];
//! the large parts (essays, outcomes, the dashboard's lists of batches) are addressed by key,
//! with one operation per row the page wrote ([`add`], [`replace`]) and, for ordered lists,
//! the moves that [`reorder`] derives from the lists' keys before and after.
//!
//! Paths are JSON Pointers (RFC 6901) built with [`pointer`], which escapes `~` and `/` in keys
//! (today's ids cannot contain them, but the escaping does not depend on that).

use json_patch::jsonptr::{PointerBuf, Token};
use json_patch::{AddOperation, MoveOperation, PatchOperation, RemoveOperation, ReplaceOperation};
use serde_json::Value;

/// A JSON Pointer made of `tokens`, each escaped as RFC 6901 requires.
pub fn pointer<'t>(tokens: impl IntoIterator<Item = &'t str>) -> PointerBuf {
    PointerBuf::from_tokens(tokens.into_iter().map(Token::new))
}

/// `base` followed by `tokens`.
pub fn under<'t>(base: &PointerBuf, tokens: impl IntoIterator<Item = &'t str>) -> PointerBuf {
    let mut path = base.clone();
    for token in tokens {
        path.push_back(Token::new(token));
    }
    path
}

/// `base` followed by an array index.
pub fn at_index(base: &PointerBuf, index: usize) -> PointerBuf {
    let mut path = base.clone();
    path.push_back(Token::from(index));
    path
}

pub fn add(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path, value })
}

pub fn replace(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation { path, value })
}

pub fn remove(path: PointerBuf) -> PatchOperation {
    PatchOperation::Remove(RemoveOperation { path })
}

pub fn move_to(from: PointerBuf, path: PointerBuf) -> PatchOperation {
    PatchOperation::Move(MoveOperation { from, path })
}

/// Appends the operations that turn `before` into `after`, both found at `base` in the
/// document ([`json_patch::diff`], with every path moved under `base`). For small values only:
/// the diff walks both whole.
pub fn diff_at(base: &PointerBuf, before: &Value, after: &Value, ops: &mut Vec<PatchOperation>) {
    for op in json_patch::diff(before, after).0 {
        ops.push(match op {
            PatchOperation::Add(AddOperation { path, value }) => add(base.concat(&path), value),
            PatchOperation::Remove(RemoveOperation { path }) => remove(base.concat(&path)),
            PatchOperation::Replace(ReplaceOperation { path, value }) => {
                replace(base.concat(&path), value)
            }
            PatchOperation::Move(MoveOperation { from, path }) => {
                move_to(base.concat(&from), base.concat(&path))
            }
            other => other,
        });
    }
}

/// One ordered list of a document, identified by keys: where it is, and its keys before and
/// after the change.
#[derive(Debug, Clone)]
pub struct List<'a> {
    pub path: PointerBuf,
    pub before: &'a [String],
    pub after: &'a [String],
}

/// Appends the operations that turn every list's `before` into its `after`: a key that left
/// every list is removed, a key that is somewhere already is moved (within its list or from
/// another one, so its value travels with it), and a key that is new is added with
/// `value(key)`. Returns the keys that were added (their values are already final).
///
/// The lists must not share keys (before, or after). At most one operation per key that
/// changed place, plus one per key that left.
pub fn reorder<E>(
    lists: &[List<'_>],
    ops: &mut Vec<PatchOperation>,
    mut value: impl FnMut(&str) -> Result<Value, E>,
) -> Result<Vec<String>, E> {
    let staying = |key: &String| lists.iter().any(|l| l.after.contains(key));
    let mut current: Vec<Vec<String>> = lists.iter().map(|l| l.before.to_vec()).collect();
    // Removals first, from the end of each list so that earlier indices stay valid.
    for (list, keys) in lists.iter().zip(current.iter_mut()) {
        for index in (0..keys.len()).rev() {
            if !staying(&keys[index]) {
                ops.push(remove(at_index(&list.path, index)));
                keys.remove(index);
            }
        }
    }
    let mut added = Vec::new();
    // Then each list is made right from its first position on. Positions already made right
    // are never touched again: a key still to be placed is always found after them (in its
    // own list) or in a list's tail of leftovers (in another).
    for (l, list) in lists.iter().enumerate() {
        for (index, key) in list.after.iter().enumerate() {
            if current[l].get(index) == Some(key) {
                continue;
            }
            let found = current
                .iter()
                .enumerate()
                .find_map(|(m, keys)| keys.iter().position(|k| k == key).map(|j| (m, j)));
            match found {
                Some((m, j)) => {
                    ops.push(move_to(
                        at_index(&lists[m].path, j),
                        at_index(&list.path, index),
                    ));
                    let moved = current[m].remove(j);
                    current[l].insert(index, moved);
                }
                None => {
                    ops.push(add(at_index(&list.path, index), value(key)?));
                    current[l].insert(index, key.clone());
                    added.push(key.clone());
                }
            }
        }
    }
    // Every leftover was in some list's `after`, so it has been moved there; nothing remains
    // past the end of a list. (Defensive: remove anything that does.)
    for (list, keys) in lists.iter().zip(current.iter_mut()) {
        while keys.len() > list.after.len() {
            ops.push(remove(at_index(&list.path, list.after.len())));
            keys.remove(list.after.len());
        }
    }
    Ok(added)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn document(lists: &[Vec<String>]) -> Value {
        json!({
            "a": lists[0].iter().map(|k| json!({"key": k})).collect::<Vec<_>>(),
            "b": lists[1].iter().map(|k| json!({"key": k})).collect::<Vec<_>>(),
        })
    }

    /// Two disjoint lists of keys drawn from `universe`, each in a random order.
    fn lists(universe: usize) -> impl Strategy<Value = Vec<Vec<String>>> {
        (
            proptest::collection::vec(0..3u8, universe),
            Just((0..universe).collect::<Vec<_>>()).prop_shuffle(),
        )
            .prop_map(|(slots, order)| {
                let mut lists = vec![Vec::new(), Vec::new()];
                for key in order {
                    if let Some(list) = lists.get_mut(usize::from(slots[key])) {
                        list.push(format!("k{key}"));
                    }
                }
                lists
            })
    }

    proptest! {
        #[test]
        fn reordering_turns_the_lists_before_into_the_lists_after(
            before in lists(12),
            after in lists(12),
        ) {
            let paths = [pointer(["a"]), pointer(["b"])];
            let specs: Vec<List<'_>> = (0..2)
                .map(|i| List { path: paths[i].clone(), before: &before[i], after: &after[i] })
                .collect();
            let mut ops = Vec::new();
            let added = reorder::<()>(&specs, &mut ops, |k| Ok(json!({"key": k}))).unwrap();
            let mut doc = document(&before);
            json_patch::patch(&mut doc, &ops).unwrap();
            prop_assert_eq!(doc, document(&after));
            let was: Vec<&String> = before.iter().flatten().collect();
            for key in &added {
                prop_assert!(!was.contains(&key), "{} was there already: move it", key);
            }
        }
    }

    #[test]
    fn keys_with_slashes_and_tildes_are_escaped() {
        let mut doc = json!({"m": {}});
        let ops = vec![add(pointer(["m", "a/b~c"]), json!(1))];
        json_patch::patch(&mut doc, &ops).unwrap();
        assert_eq!(doc, json!({"m": {"a/b~c": 1}}));
        assert_eq!(serde_json::to_value(&ops).unwrap()[0]["path"], "/m/a~1b~0c");
    }

    #[test]
    fn a_diff_at_a_path_applies_there() {
        let mut doc = json!({"x": {"totals": {"a": 1, "b": 2}}});
        let mut ops = Vec::new();
        diff_at(
            &pointer(["x", "totals"]),
            &json!({"a": 1, "b": 2}),
            &json!({"a": 3, "c": 1}),
            &mut ops,
        );
        json_patch::patch(&mut doc, &ops).unwrap();
        assert_eq!(doc, json!({"x": {"totals": {"a": 3, "c": 1}}}));
    }
}
