//! A user-space UDP relay on 127.0.0.1 that injects WAN faults between two
//! real sockets: delay, jitter (which reorders), loss, duplication and a
//! partition switch. The kernel here has no `netem`, so tests and benchmarks
//! put this relay between two QUIC endpoints instead.
//!
//! Clients send to [`Relay::local_addr`]. For each distinct client source
//! address the relay opens its own upstream socket on 127.0.0.1 connected to
//! the target, so the target sees one address per client (a QUIC connection
//! is identified by it); what the target sends back on that socket returns to
//! that client from the listening socket.
//!
//! Each direction (client → target, target → client) has its own delay queue
//! and its own random generator seeded from [`Faults::seed`], so a run is
//! reproducible given the same traffic. Every queue and table is bounded:
//! beyond [`QUEUE_DATAGRAMS_MAX`], [`QUEUE_BYTES_MAX`] or [`CLIENTS_MAX`]
//! datagrams are dropped and counted in [`RelayStats::dropped`].
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::time::Duration;
//! use archipelago::transport::relay::{Faults, Relay};
//! use tokio::net::UdpSocket;
//!
//! let target = UdpSocket::bind("127.0.0.1:0").await?;
//! let faults = Faults { delay: Duration::from_millis(10), ..Faults::default() };
//! let relay = Relay::start(target.local_addr()?, faults).await?;
//!
//! let client = UdpSocket::bind("127.0.0.1:0").await?;
//! client.send_to(b"hello", relay.local_addr()).await?;
//! let mut buf = [0u8; 16];
//! let (n, _) = target.recv_from(&mut buf).await?;
//! assert_eq!(&buf[..n], b"hello");
//! assert_eq!(relay.stats().forwarded, 1);
//! relay.stop().await;
//! # std::io::Result::Ok(()) }).unwrap();
//! ```

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::net::UdpSocket;
use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Most datagrams waiting in one direction's delay queue; more are dropped.
pub const QUEUE_DATAGRAMS_MAX: usize = 65_536;
/// Most payload bytes waiting in one direction's delay queue; more are dropped.
pub const QUEUE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most distinct client addresses the relay maps to upstream sockets;
/// datagrams from further clients are dropped.
pub const CLIENTS_MAX: usize = 1024;
/// Receive buffer size: the largest UDP payload.
pub const DATAGRAM_BYTES_MAX: usize = 65_535;

/// Mixed into the seed of the target → client direction so that the two
/// directions draw different random sequences from one [`Faults::seed`].
const BACKWARD_SEED_MIX: u64 = 0x9e37_79b9_7f4a_7c15;

/// The faults applied to every datagram, in each direction independently.
///
/// The default injects nothing: no delay, no loss, no duplication.
/// Probabilities outside `0..=1` behave as the nearest bound (NaN as 0).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Base one-way delay.
    pub delay: Duration,
    /// Each datagram's delay is `delay` plus a uniform offset in
    /// `-jitter..=jitter`, clamped at zero. Non-zero jitter reorders.
    pub jitter: Duration,
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a delivered datagram is also delivered a second time
    /// (with its own delay).
    pub duplicate: f64,
    /// Seed of the per-direction random generators.
    pub seed: u64,
}

/// Counters over both directions since the relay started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Datagrams sent on (duplicate copies included).
    pub forwarded: u64,
    /// Datagrams dropped: by loss, by the partition, by a full queue or
    /// client table, or because sending failed.
    pub dropped: u64,
    /// Extra copies scheduled by duplication.
    pub duplicated: u64,
    /// Payload bytes of the forwarded datagrams.
    pub bytes: u64,
}

/// A running relay. Dropping it signals its tasks to stop; [`Relay::stop`]
/// also waits for them (and so for its sockets to close).
#[derive(Debug)]
pub struct Relay {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    /// Dropping the sender wakes every task with "stop".
    shutdown: watch::Sender<()>,
    tasks: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Listens on 127.0.0.1:0 and forwards to `target`, which must be an
    /// IPv4 loopback address with a non-zero port (anything else is refused
    /// with [`io::ErrorKind::InvalidInput`]). Must be called within a tokio
    /// runtime with time and I/O enabled.
    pub async fn start(target: SocketAddr, faults: Faults) -> io::Result<Relay> {
        let loopback_v4 = matches!(target, SocketAddr::V4(v4) if v4.ip().is_loopback());
        if !loopback_v4 || target.port() == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("relay target {target} is not an IPv4 loopback address with a port"),
            ));
        }
        let listener = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?);
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            forward: Direction::new(&faults, faults.seed),
            backward: Direction::new(&faults, faults.seed ^ BACKWARD_SEED_MIX),
            partitioned: AtomicBool::new(false),
            counters: Counters::default(),
        });
        let (shutdown, stopped) = watch::channel(());
        let tasks = vec![
            tokio::spawn(listen(
                listener.clone(),
                target,
                shared.clone(),
                stopped.clone(),
            )),
            tokio::spawn(deliver(
                Side::Forward,
                listener.clone(),
                shared.clone(),
                stopped.clone(),
            )),
            tokio::spawn(deliver(Side::Backward, listener, shared.clone(), stopped)),
        ];
        Ok(Relay {
            local_addr,
            shared,
            shutdown,
            tasks,
        })
    }

    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Replaces the faults of both directions for datagrams arriving from now
    /// on, and reseeds both random generators from `faults.seed` (so the same
    /// sequence of calls and traffic gives the same run). Datagrams already
    /// queued keep their delivery time.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.forward.reset(&faults, faults.seed);
        self.shared
            .backward
            .reset(&faults, faults.seed ^ BACKWARD_SEED_MIX);
    }

    /// While partitioned every datagram in both directions is dropped (and
    /// counted), including those already queued when their time comes.
    pub fn set_partitioned(&self, partitioned: bool) {
        self.shared.partitioned.store(partitioned, Ordering::SeqCst);
    }

    /// Whether the relay is partitioned.
    pub fn is_partitioned(&self) -> bool {
        self.shared.partitioned.load(Ordering::SeqCst)
    }

    /// The counters so far, over both directions.
    pub fn stats(&self) -> RelayStats {
        let counters = &self.shared.counters;
        RelayStats {
            forwarded: counters.forwarded.load(Ordering::Relaxed),
            dropped: counters.dropped.load(Ordering::Relaxed),
            duplicated: counters.duplicated.load(Ordering::Relaxed),
            bytes: counters.bytes.load(Ordering::Relaxed),
        }
    }

    /// Stops every task and waits for them, so all sockets are closed on
    /// return. Queued datagrams are discarded.
    pub async fn stop(self) {
        let Relay {
            shutdown, tasks, ..
        } = self;
        drop(shutdown);
        for task in tasks {
            // A task that panicked has nothing left to stop.
            let _ = task.await;
        }
    }
}

/// State shared by the relay handle and its tasks.
#[derive(Debug)]
struct Shared {
    /// Client → target.
    forward: Direction,
    /// Target → client.
    backward: Direction,
    partitioned: AtomicBool,
    counters: Counters,
}

impl Shared {
    fn direction(&self, side: Side) -> &Direction {
        match side {
            Side::Forward => &self.forward,
            Side::Backward => &self.backward,
        }
    }

    fn dropped(&self, count: u64) {
        self.counters.dropped.fetch_add(count, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Counters {
    forwarded: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    bytes: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Forward,
    Backward,
}

/// Where a queued datagram goes.
#[derive(Debug)]
enum Destination {
    /// Forward: the client's upstream socket, connected to the target.
    Upstream(Arc<UdpSocket>),
    /// Backward: the client, from the listening socket.
    Client(SocketAddr),
}

/// One direction's delay queue. Receivers push under the lock and wake the
/// single delivery task, which sleeps until the earliest due time.
#[derive(Debug)]
struct Direction {
    queue: Mutex<Queue>,
    wake: Notify,
}

#[derive(Debug)]
struct Queue {
    faults: Faults,
    rng: StdRng,
    /// Min-heap on (due, seq) through the reversed [`Ord`] of [`Pending`].
    pending: BinaryHeap<Pending>,
    pending_bytes: usize,
    /// Ties on equal due times break in arrival order, so a relay without
    /// jitter never reorders.
    next_seq: u64,
}

impl Direction {
    fn new(faults: &Faults, seed: u64) -> Direction {
        Direction {
            queue: Mutex::new(Queue {
                faults: faults.clone(),
                rng: StdRng::seed_from_u64(seed),
                pending: BinaryHeap::new(),
                pending_bytes: 0,
                next_seq: 0,
            }),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The queue holds no invariant a panicking holder could break
        // half-way that matters more than keeping the relay running.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn reset(&self, faults: &Faults, seed: u64) {
        let mut queue = self.lock();
        queue.faults = faults.clone();
        queue.rng = StdRng::seed_from_u64(seed);
    }

    /// Applies the faults to one arriving datagram and queues its copies.
    fn admit(&self, shared: &Shared, payload: &[u8], destination: Destination) {
        if shared.partitioned.load(Ordering::SeqCst) {
            shared.dropped(1);
            return;
        }
        let now = Instant::now();
        let mut queue = self.lock();
        let Queue { faults, rng, .. } = &mut *queue;
        if chance(rng, faults.loss) {
            drop(queue);
            shared.dropped(1);
            return;
        }
        let first = now + one_way_delay(rng, faults);
        let second = chance(rng, faults.duplicate).then(|| now + one_way_delay(rng, faults));
        let payload: Arc<[u8]> = Arc::from(payload);
        let destination = Arc::new(destination);
        let mut queued = false;
        for due in std::iter::once(first).chain(second) {
            if queue.pending.len() >= QUEUE_DATAGRAMS_MAX
                || queue.pending_bytes + payload.len() > QUEUE_BYTES_MAX
            {
                shared.dropped(1);
                continue;
            }
            if queued {
                shared.counters.duplicated.fetch_add(1, Ordering::Relaxed);
            }
            let seq = queue.next_seq;
            queue.next_seq += 1;
            queue.pending_bytes += payload.len();
            queue.pending.push(Pending {
                due,
                seq,
                payload: payload.clone(),
                destination: destination.clone(),
            });
            queued = true;
        }
        drop(queue);
        if queued {
            self.wake.notify_one();
        }
    }

    /// Moves every datagram due by `now` into `batch`; returns the next due
    /// time, if any remains.
    fn take_due(&self, now: Instant, batch: &mut Vec<Pending>) -> Option<Instant> {
        let mut queue = self.lock();
        while queue.pending.peek().is_some_and(|next| next.due <= now) {
            if let Some(pending) = queue.pending.pop() {
                queue.pending_bytes -= pending.payload.len();
                batch.push(pending);
            }
        }
        queue.pending.peek().map(|next| next.due)
    }
}

/// True with probability `p` (clamped to `0..=1`; NaN is 0). Always draws
/// one number, so the random sequence does not depend on `p`.
fn chance(rng: &mut StdRng, p: f64) -> bool {
    rng.random::<f64>() < p
}

/// `delay` plus a uniform offset in `-jitter..=jitter`, never negative.
fn one_way_delay(rng: &mut StdRng, faults: &Faults) -> Duration {
    if faults.jitter.is_zero() {
        return faults.delay;
    }
    let offset = faults.jitter.mul_f64(rng.random::<f64>() * 2.0);
    (faults.delay + offset).saturating_sub(faults.jitter)
}

/// A datagram waiting for its delivery time.
#[derive(Debug)]
struct Pending {
    due: Instant,
    seq: u64,
    payload: Arc<[u8]>,
    destination: Arc<Destination>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    /// Reversed, so that [`BinaryHeap`] (a max-heap) pops the earliest.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// Receives from clients on the listening socket, opening one upstream
/// socket (and its receiving task) per new client, and queues forward.
async fn listen(
    listener: Arc<UdpSocket>,
    target: SocketAddr,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<()>,
) {
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut upstream_tasks = JoinSet::new();
    let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
    loop {
        let (len, client) = tokio::select! {
            _ = stopped.changed() => break,
            received = listener.recv_from(&mut buf) => match received {
                Ok(received) => received,
                // Errors on an unconnected UDP socket are transient
                // (e.g. an ICMP report about an earlier send).
                Err(_) => continue,
            },
        };
        let upstream = match clients.get(&client) {
            Some(upstream) => upstream.clone(),
            None => {
                if clients.len() >= CLIENTS_MAX {
                    shared.dropped(1);
                    continue;
                }
                let Ok(socket) = connect_upstream(target).await else {
                    shared.dropped(1);
                    continue;
                };
                let socket = Arc::new(socket);
                upstream_tasks.spawn(receive_upstream(
                    socket.clone(),
                    client,
                    shared.clone(),
                    stopped.clone(),
                ));
                clients.insert(client, socket.clone());
                socket
            }
        };
        shared
            .forward
            .admit(&shared, &buf[..len], Destination::Upstream(upstream));
    }
    drop(clients);
    while upstream_tasks.join_next().await.is_some() {}
}

async fn connect_upstream(target: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    socket.connect(target).await?;
    Ok(socket)
}

/// Receives from the target on one client's upstream socket and queues
/// backward to that client.
async fn receive_upstream(
    upstream: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<()>,
) {
    let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
    loop {
        let len = tokio::select! {
            _ = stopped.changed() => break,
            received = upstream.recv(&mut buf) => match received {
                Ok(len) => len,
                // A connected UDP socket reports "connection refused" after
                // sending to a closed port; the target may come back.
                Err(_) => continue,
            },
        };
        shared
            .backward
            .admit(&shared, &buf[..len], Destination::Client(client));
    }
}

/// The delivery task of one direction: sends what is due, then sleeps until
/// the next due time or until a receiver queues something.
async fn deliver(
    side: Side,
    listener: Arc<UdpSocket>,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<()>,
) {
    let direction = shared.direction(side);
    let mut batch = Vec::new();
    loop {
        let next_due = direction.take_due(Instant::now(), &mut batch);
        for pending in batch.drain(..) {
            if shared.partitioned.load(Ordering::SeqCst) {
                shared.dropped(1);
                continue;
            }
            let sent = match &*pending.destination {
                Destination::Upstream(upstream) => upstream.send(&pending.payload).await,
                Destination::Client(client) => listener.send_to(&pending.payload, client).await,
            };
            match sent {
                Ok(_) => {
                    let counters = &shared.counters;
                    counters.forwarded.fetch_add(1, Ordering::Relaxed);
                    let len = u64::try_from(pending.payload.len()).unwrap_or(u64::MAX);
                    counters.bytes.fetch_add(len, Ordering::Relaxed);
                }
                Err(_) => shared.dropped(1),
            }
        }
        let sleep = async {
            match next_due {
                Some(due) => tokio::time::sleep_until(due).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stopped.changed() => break,
            // A stored permit covers a push between `take_due` and here.
            _ = direction.wake.notified() => {}
            _ = sleep => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_pops_earliest_first_and_keeps_arrival_order_on_ties() {
        let now = Instant::now();
        let destination = Arc::new(Destination::Client(SocketAddr::from(([127, 0, 0, 1], 1))));
        let mut heap = BinaryHeap::new();
        for (seq, ms) in [(0, 30), (1, 10), (2, 10), (3, 20)] {
            heap.push(Pending {
                due: now + Duration::from_millis(ms),
                seq,
                payload: Arc::from(&b""[..]),
                destination: destination.clone(),
            });
        }
        let order: Vec<u64> = std::iter::from_fn(|| heap.pop().map(|p| p.seq)).collect();
        assert_eq!(order, vec![1, 2, 3, 0]);
    }

    #[test]
    fn delay_with_jitter_stays_in_range_and_never_negative() {
        let mut rng = StdRng::seed_from_u64(7);
        let faults = Faults {
            delay: Duration::from_millis(5),
            jitter: Duration::from_millis(10),
            ..Faults::default()
        };
        let mut zero = 0;
        for _ in 0..10_000 {
            let delay = one_way_delay(&mut rng, &faults);
            assert!(delay <= Duration::from_millis(15));
            zero += usize::from(delay.is_zero());
        }
        // About a quarter of the offsets fall below -5 ms and clamp to zero.
        assert!((1_500..3_500).contains(&zero), "{zero}");
    }

    #[test]
    fn chance_handles_bounds_and_nan() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..1000 {
            assert!(chance(&mut rng, 1.0));
            assert!(chance(&mut rng, 2.0));
            assert!(!chance(&mut rng, 0.0));
            assert!(!chance(&mut rng, -1.0));
            assert!(!chance(&mut rng, f64::NAN));
        }
    }
}
