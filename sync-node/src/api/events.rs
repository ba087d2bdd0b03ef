//! `GET /v1/events`: the node's event log as server-sent events.
//!
//! Each event carries its sequence id (`id:`), its kind (`event:` `change`,
//! `conflict`, `peer` or `reset`; see [`crate::events::EventKind`]) and
//! JSON data. A client that reconnects with
//! `Last-Event-ID: K` first gets the kept events after `K`, then live ones;
//! when events after `K` were lost (too old for the ring, or from an earlier
//! run of the node), or when the client reads too slowly to keep up, it gets
//! a `reset` event first and should re-read whatever state it follows. The
//! stream ends when the node shuts down.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use serde_json::json;
use tokio::sync::broadcast;

use super::error::ApiError;
use super::ApiState;
use crate::events::{EventKind, EventLog, NodeEvent};

/// Interval of the keep-alive comments sent on an idle stream.
pub(crate) const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// The request header a resuming client sends.
const LAST_EVENT_ID: &str = "last-event-id";

/// What one client's stream still has to send.
struct Reader {
    log: Arc<EventLog>,
    /// Events to send before reading live ones: a reset and the replay.
    queued: VecDeque<Arc<NodeEvent>>,
    live: broadcast::Receiver<Arc<NodeEvent>>,
    /// Live events this client missed since the last one it was sent.
    missed: u64,
}

fn reset(id: u64, reason: String) -> Arc<NodeEvent> {
    Arc::new(NodeEvent {
        id,
        kind: EventKind::Reset,
        data: json!({ "reason": reason }),
    })
}

fn to_sse(event: &NodeEvent) -> Event {
    Event::default()
        .id(event.id.to_string())
        .event(event.kind.as_str())
        .data(event.data.to_string())
}

impl Reader {
    /// The next event to send, or `None` once the log is closed.
    async fn next(&mut self) -> Option<Arc<NodeEvent>> {
        loop {
            if let Some(event) = self.queued.pop_front() {
                return Some(event);
            }
            let received = tokio::select! {
                () = self.log.closed() => return None,
                received = self.live.recv() => received,
            };
            match received {
                Ok(event) => {
                    if self.missed > 0 {
                        // The reset stands just before the first event sent
                        // after the gap, so a reconnect with its id resumes
                        // there.
                        let reason = format!(
                            "this client fell {} events behind and missed them",
                            self.missed
                        );
                        self.missed = 0;
                        self.queued.push_back(reset(event.id - 1, reason));
                    }
                    self.queued.push_back(event);
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => self.missed += missed,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// `GET /v1/events` (optionally with `Last-Event-ID`).
pub(crate) async fn stream(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Some(log) = state.events.clone() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "events_off",
            "this API serves no event stream",
        ));
    };
    let after = match headers.get(LAST_EVENT_ID) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "bad_last_event_id",
                        "Last-Event-ID must be an event id (a decimal integer)",
                    )
                })?,
        ),
    };
    let subscription = log.subscribe(after);
    let mut queued = VecDeque::with_capacity(subscription.replay.len() + 1);
    if let Some(id) = subscription.reset_id {
        queued.push_back(reset(
            id,
            "events after Last-Event-ID are no longer kept".to_owned(),
        ));
    }
    queued.extend(subscription.replay);
    let reader = Reader {
        log,
        queued,
        live: subscription.live,
        missed: 0,
    };
    let events = stream::unfold(reader, |mut reader| async move {
        let event = reader.next().await?;
        Some((Ok(to_sse(&event)), reader))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE_INTERVAL)))
}
