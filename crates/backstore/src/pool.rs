//! A bounded pool of threads for blocking backstore calls.
//!
//! `N` workers take jobs from a queue of bounded depth; [`IoPool::submit`] blocks while the
//! queue is full (back-pressure), [`IoPool::try_submit`] refuses instead. Each job's result comes
//! back through its own [`Completion`]. A job that panics does not take its worker with it; its
//! completion reports [`JobLost`]. Dropping the pool lets queued jobs finish, then joins the
//! workers. The daemon may equally use tokio's `spawn_blocking`; this is for std-only callers.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the I/O pool queue is full")]
    Full,
    #[error("the I/O pool has shut down")]
    Closed,
}

/// The job panicked, so it produced no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the I/O job panicked")]
pub struct JobLost;

/// The pending result of one submitted job.
#[derive(Debug)]
pub struct Completion<T>(Receiver<T>);

impl<T> Completion<T> {
    /// Block until the job has run.
    pub fn wait(self) -> Result<T, JobLost> {
        self.0.recv().map_err(|_| JobLost)
    }

    /// The result if the job has run; `Ok(None)` while it is pending.
    pub fn try_wait(&self) -> Result<Option<T>, JobLost> {
        match self.0.try_recv() {
            Ok(v) => Ok(Some(v)),
            Err(mpsc::TryRecvError::Empty) => Ok(None),
            Err(mpsc::TryRecvError::Disconnected) => Err(JobLost),
        }
    }
}

/// A fixed set of worker threads behind a bounded queue. See the module documentation.
#[derive(Debug)]
pub struct IoPool {
    queue: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl IoPool {
    /// Start `threads` workers (at least one) behind a queue of `depth` waiting jobs.
    pub fn new(threads: usize, depth: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Job>(depth);
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..threads.max(1))
            .map(|i| {
                let rx = Arc::clone(&rx);
                std::thread::Builder::new()
                    .name(format!("ironlun-io-{i}"))
                    .spawn(move || worker(&rx))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            queue: Some(tx),
            workers,
        })
    }

    /// Queue `job`, waiting while the queue is full.
    pub fn submit<T, F>(&self, job: F) -> Result<Completion<T>, SubmitError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (job, completion) = wrap(job);
        let queue = self.queue.as_ref().ok_or(SubmitError::Closed)?;
        queue.send(job).map_err(|_| SubmitError::Closed)?;
        Ok(completion)
    }

    /// Queue `job` if there is room now.
    pub fn try_submit<T, F>(&self, job: F) -> Result<Completion<T>, SubmitError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (job, completion) = wrap(job);
        let queue = self.queue.as_ref().ok_or(SubmitError::Closed)?;
        queue.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Full,
            TrySendError::Disconnected(_) => SubmitError::Closed,
        })?;
        Ok(completion)
    }
}

fn wrap<T, F>(job: F) -> (Job, Completion<T>)
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        // The submitter may have dropped its completion; the result is then discarded.
        let _ = tx.send(job());
    });
    (job, Completion(rx))
}

fn worker(queue: &Mutex<Receiver<Job>>) {
    loop {
        let next = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(job) = next else { return };
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            tracing::error!("an I/O pool job panicked");
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.queue = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::{BlockBackend, RamBackend};
    use std::sync::mpsc::channel;
    use std::time::Duration;

    #[test]
    fn runs_backstore_jobs_and_returns_results() {
        let pool = IoPool::new(3, 8).unwrap();
        let ram = Arc::new(RamBackend::new(1 << 20).unwrap());
        let writes: Vec<_> = (0..32u8)
            .map(|i| {
                let ram = Arc::clone(&ram);
                pool.submit(move || ram.write(u64::from(i) * 4096, &[i + 1; 4096], false))
                    .unwrap()
            })
            .collect();
        for w in writes {
            w.wait().unwrap().unwrap();
        }
        let ram2 = Arc::clone(&ram);
        let read = pool
            .submit(move || ram2.read(31 * 4096, 4096))
            .unwrap()
            .wait()
            .unwrap();
        assert!(read.unwrap().iter().all(|&b| b == 32));
    }

    #[test]
    fn rejects_when_queue_full() {
        let pool = IoPool::new(1, 1).unwrap();
        let (release_tx, release_rx) = channel::<()>();
        let (started_tx, started_rx) = channel::<()>();
        let blocker = pool
            .submit(move || {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
            })
            .unwrap();
        started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let queued = pool.try_submit(|| 1).unwrap();
        assert_eq!(pool.try_submit(|| 2).err(), Some(SubmitError::Full));
        release_tx.send(()).unwrap();
        blocker.wait().unwrap();
        assert_eq!(queued.wait(), Ok(1));
    }

    #[test]
    fn panicking_job_loses_only_itself() {
        let pool = IoPool::new(1, 4).unwrap();
        let lost = pool.submit(|| -> u8 { panic!("boom") }).unwrap();
        assert_eq!(lost.wait(), Err(JobLost));
        assert_eq!(pool.submit(|| 7).unwrap().wait(), Ok(7));
    }

    #[test]
    fn drop_finishes_queued_jobs() {
        let pool = IoPool::new(2, 16).unwrap();
        let done: Vec<_> = (0..16)
            .map(|i| pool.submit(move || i * 2).unwrap())
            .collect();
        drop(pool);
        let sum: i32 = done
            .into_iter()
            .map(|c| c.try_wait().unwrap().unwrap())
            .sum();
        assert_eq!(sum, (0..16).map(|i| i * 2).sum());
    }
}
