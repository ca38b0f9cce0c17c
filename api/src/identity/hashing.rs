//! Password hashing (argon2id) on a bounded pool with a bounded queue and a deadline.
//!
//! At most `workers` hashes run at once (each takes `memory_kib` of memory and one core for
//! tens of milliseconds); at most `queue` more wait for a worker, each for at most `deadline`.
//! A full queue answers [`HashError::Busy`] at once (503 with `Retry-After`); a wait past the
//! deadline answers [`HashError::Deadline`] (503 too). A request whose client goes away while
//! it waits is dropped with its place in the queue; one whose hash already started keeps its
//! worker until the hash ends (one hash, never more), so the bound holds whatever clients do.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::{OnceCell, Semaphore};

/// Why a hash was not computed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// The queue is full: try again shortly.
    #[error("too many logins at once; retry shortly")]
    Busy,
    /// No worker became free within the deadline.
    #[error("logins are slow to process right now; retry shortly")]
    Deadline,
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// The pool's bounds and the argon2id cost of new hashes.
#[derive(Debug, Clone, Copy)]
pub struct HashingLimits {
    pub workers: usize,
    pub queue: usize,
    pub deadline: Duration,
    /// argon2id memory cost (KiB), iterations and lanes for new hashes; existing hashes are
    /// checked with the parameters they were made with.
    pub memory_kib: u32,
    pub iterations: u32,
    pub lanes: u32,
}

/// Counters for `/metrics` and tests.
#[derive(Debug, Default)]
pub struct HashingStats {
    pub in_progress: AtomicUsize,
    /// The most hashes that ever ran at once.
    pub peak: AtomicUsize,
    pub waiting: AtomicUsize,
    pub completed: AtomicU64,
    pub refused_busy: AtomicU64,
    pub refused_deadline: AtomicU64,
}

/// The bounded hashing pool (cheap to clone).
#[derive(Clone)]
pub struct Hasher {
    limits: HashingLimits,
    params: Params,
    permits: Arc<Semaphore>,
    pub stats: Arc<HashingStats>,
    /// A hash of a random password with the configured cost, checked when a username is
    /// unknown so that the answer takes as long as for a wrong password.
    dummy: Arc<OnceCell<String>>,
}

impl Hasher {
    pub fn new(limits: HashingLimits) -> anyhow::Result<Self> {
        let params = Params::new(limits.memory_kib, limits.iterations, limits.lanes, None)
            .map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
        anyhow::ensure!(limits.workers >= 1, "login_hash_workers must be at least 1");
        Ok(Self {
            permits: Arc::new(Semaphore::new(limits.workers)),
            limits,
            params,
            stats: Arc::default(),
            dummy: Arc::default(),
        })
    }

    pub fn limits(&self) -> HashingLimits {
        self.limits
    }

    fn argon2(params: Params) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
    }

    /// Hashes a new password (PHC string format).
    pub async fn hash(&self, password: String) -> Result<String, HashError> {
        let params = self.params.clone();
        self.run(move || {
            Self::argon2(params)
                .hash_password(password.as_bytes())
                .map(|h| h.to_string())
                .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))
        })
        .await?
        .map_err(HashError::Failed)
    }

    /// Checks a password against a stored hash; `None` as the hash checks it against a dummy
    /// hash of the same cost (and answers `false`).
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool, HashError> {
        let (hash, real) = match hash {
            Some(hash) => (hash, true),
            None => (self.dummy().await?, false),
        };
        let params = self.params.clone();
        let ok = self
            .run(move || {
                Self::argon2(params)
                    .verify_password(password.as_bytes(), hash.as_str())
                    .is_ok()
            })
            .await?;
        Ok(ok && real)
    }

    /// Computes the dummy hash now (on the pool), so that no login pays for it.
    pub async fn warm_up(&self) -> Result<(), HashError> {
        self.dummy().await.map(drop)
    }

    async fn dummy(&self) -> Result<String, HashError> {
        let params = self.params.clone();
        self.dummy
            .get_or_try_init(|| async move {
                self.run(move || {
                    use rand::Rng;
                    let random: [u8; 24] = rand::rng().random();
                    Self::argon2(params)
                        .hash_password(&random)
                        .map(|h| h.to_string())
                        .map_err(|e| anyhow::anyhow!("hashing the dummy password: {e}"))
                })
                .await?
                .map_err(HashError::Failed)
            })
            .await
            .cloned()
    }

    /// Runs `work` on a blocking thread once a worker is free (see the module's bounds).
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let stats = &self.stats;
                if stats.waiting.fetch_add(1, Ordering::SeqCst) >= self.limits.queue {
                    stats.waiting.fetch_sub(1, Ordering::SeqCst);
                    stats.refused_busy.fetch_add(1, Ordering::Relaxed);
                    return Err(HashError::Busy);
                }
                // Leaves the queue however this wait ends (a dropped request included).
                struct Waiting<'a>(&'a AtomicUsize);
                impl Drop for Waiting<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let _waiting = Waiting(&stats.waiting);
                match tokio::time::timeout(
                    self.limits.deadline,
                    self.permits.clone().acquire_owned(),
                )
                .await
                {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => return Err(HashError::Busy),
                    Err(_) => {
                        stats.refused_deadline.fetch_add(1, Ordering::Relaxed);
                        return Err(HashError::Deadline);
                    }
                }
            }
        };
        let stats = self.stats.clone();
        // The permit moves into the blocking task: if the request is dropped now, the worker
        // stays taken until this hash ends, so no more than `workers` hashes ever run.
        tokio::task::spawn_blocking(move || {
            let running = stats.in_progress.fetch_add(1, Ordering::SeqCst) + 1;
            stats.peak.fetch_max(running, Ordering::SeqCst);
            let out = work();
            stats.in_progress.fetch_sub(1, Ordering::SeqCst);
            stats.completed.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            out
        })
        .await
        .map_err(|e| HashError::Failed(anyhow::anyhow!("a hashing task failed: {e}")))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn small(workers: usize, queue: usize) -> Hasher {
        Hasher::new(HashingLimits {
            workers,
            queue,
            deadline: Duration::from_secs(5),
            memory_kib: 1024,
            iterations: 1,
            lanes: 1,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn a_hash_verifies_and_a_wrong_password_or_unknown_user_does_not() {
        let hasher = small(1, 4);
        let hash = hasher.hash("correct horse".to_owned()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(
            hasher
                .verify("correct horse".to_owned(), Some(hash.clone()))
                .await
                .unwrap()
        );
        assert!(
            !hasher
                .verify("wrong horse".to_owned(), Some(hash))
                .await
                .unwrap()
        );
        // The dummy hash is a real one: checking against it does the same work, says false.
        assert!(
            !hasher
                .verify("correct horse".to_owned(), None)
                .await
                .unwrap()
        );
        assert!(hasher.dummy().await.unwrap().starts_with("$argon2id$"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_is_refused_at_once_and_the_bound_holds() {
        let hasher = Hasher::new(HashingLimits {
            workers: 1,
            queue: 2,
            deadline: Duration::from_secs(30),
            memory_kib: 32 * 1024,
            iterations: 3,
            lanes: 1,
        })
        .unwrap();
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let hasher = hasher.clone();
                tokio::spawn(async move { hasher.hash(format!("password {i}")).await })
            })
            .collect();
        let mut busy = 0;
        let mut done = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => done += 1,
                Err(HashError::Busy) => busy += 1,
                Err(other) => panic!("unexpected {other}"),
            }
        }
        // Twenty at once against one worker and two places: most are refused at once.
        assert!(done >= 1 && busy >= 10, "done {done}, refused {busy}");
        assert_eq!(busy + done, 20);
        assert_eq!(hasher.stats.peak.load(Ordering::SeqCst), 1);
        assert_eq!(hasher.stats.waiting.load(Ordering::SeqCst), 0);
    }
}
