//! Scoped client tokens: named secrets that open only the documents under
//! their prefixes, optionally read-only, optionally expiring. The node's
//! admin token (`api.token`) creates, lists and revokes them:
//! `POST /v1/tokens`, `GET /v1/tokens`, `DELETE /v1/tokens/{name}` (and
//! `sync-node token create|list|revoke`).
//!
//! A token is shown once, when created; the node keeps only its SHA-256, in
//! its store's metadata (`tokens/NAME`), so tokens survive restarts and are
//! in backups. A presented token is looked up by its hash, so the lookup
//! takes the same time whatever the guess.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use archipelago::store::{Store, Write};
use archipelago::DocId;

use super::error::ApiError;
use super::extract::JsonBody;
use super::ApiState;

/// Metadata keys of tokens start with this.
const META_PREFIX: &str = "tokens/";
/// Most tokens a node holds.
pub const TOKENS_MAX: usize = 10_000;
/// Most prefixes one token has.
pub const PREFIXES_MAX: usize = 64;
/// Longest token name, in bytes.
const NAME_BYTES_MAX: usize = 64;

/// A scoped token as the node keeps it (without the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopedToken {
    /// Its name, unique at the node.
    pub name: String,
    /// Document id prefixes it opens.
    pub prefixes: Vec<String>,
    /// Whether it only reads.
    pub read_only: bool,
    /// When it was made, in milliseconds since the Unix epoch.
    pub created_at: i64,
    /// When it stops working, if it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// SHA-256 of the secret, hex.
    hash: String,
}

impl ScopedToken {
    /// Whether it opens `doc`.
    pub fn covers(&self, doc: &DocId) -> bool {
        self.prefixes
            .iter()
            .any(|p| doc.as_str().starts_with(p.as_str()))
    }

    /// Whether it has expired at `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_at.is_some_and(|at| now_ms >= at)
    }

    /// What `GET /v1/tokens` shows of it.
    fn view(&self) -> Value {
        let mut view = json!({
            "name": self.name,
            "prefixes": self.prefixes,
            "read_only": self.read_only,
            "created_at": self.created_at,
        });
        if let Some(at) = self.expires_at {
            view["expires_at"] = json!(at);
        }
        view
    }
}

/// The node's scoped tokens, loaded from its store and kept in step with it.
pub struct Tokens {
    store: Arc<dyn Store>,
    by_hash: RwLock<HashMap<String, Arc<ScopedToken>>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("count", &self.read().len())
            .finish_non_exhaustive()
    }
}

fn hash_of(secret: &[u8]) -> String {
    hex::encode(Sha256::digest(secret))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Tokens {
    /// The tokens stored in `store`.
    pub fn load(store: Arc<dyn Store>) -> Result<Tokens, archipelago::store::StoreError> {
        let mut by_hash = HashMap::new();
        for (key, value) in store.meta_prefix(META_PREFIX)? {
            match serde_json::from_slice::<ScopedToken>(&value) {
                Ok(token) => {
                    by_hash.insert(token.hash.clone(), Arc::new(token));
                }
                Err(e) => {
                    tracing::warn!(%key, error = %e, "a stored token is unreadable; it opens nothing")
                }
            }
        }
        Ok(Tokens {
            store,
            by_hash: RwLock::new(by_hash),
        })
    }

    /// No tokens, over `store` (when the stored ones cannot be read).
    pub fn empty(store: Arc<dyn Store>) -> Tokens {
        Tokens {
            store,
            by_hash: RwLock::new(HashMap::new()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<ScopedToken>>> {
        self.by_hash.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The live token `secret` is, if any.
    pub fn check(&self, secret: &[u8]) -> Option<Arc<ScopedToken>> {
        let token = self.read().get(&hash_of(secret)).cloned()?;
        (!token.expired(now_ms())).then_some(token)
    }

    /// Whether `token` still works (not revoked, not expired).
    pub fn still_valid(&self, token: &ScopedToken) -> bool {
        !token.expired(now_ms())
            && self
                .read()
                .get(&token.hash)
                .is_some_and(|t| t.name == token.name)
    }

    /// Every token, by name.
    pub fn list(&self) -> Vec<Arc<ScopedToken>> {
        let mut list: Vec<_> = self.read().values().cloned().collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Makes a token; returns its secret (shown once) and what is kept.
    fn create(&self, body: CreateBody) -> Result<(String, Arc<ScopedToken>), ApiError> {
        let bad = |message: String| ApiError::bad_request("bad_token", message);
        let name = body.name;
        if name.is_empty()
            || name.len() > NAME_BYTES_MAX
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(bad(format!(
                "a token name is 1 to {NAME_BYTES_MAX} of A-Z a-z 0-9 - _ ."
            )));
        }
        if name == "admin" {
            return Err(bad("`admin` names the node's own token".to_owned()));
        }
        if body.prefixes.is_empty() || body.prefixes.len() > PREFIXES_MAX {
            return Err(bad(format!("give 1 to {PREFIXES_MAX} prefixes")));
        }
        for prefix in &body.prefixes {
            if prefix.is_empty() || prefix.len() > archipelago::id::DOC_ID_BYTES_MAX {
                return Err(bad("a prefix is 1 to 256 bytes".to_owned()));
            }
        }
        let created_at = now_ms();
        let expires_at = match body.expires_in_s {
            Some(0) => return Err(bad("expires_in_s must be positive".to_owned())),
            Some(s) => Some(
                created_at
                    .saturating_add(i64::try_from(s).unwrap_or(i64::MAX).saturating_mul(1000)),
            ),
            None => None,
        };
        let secret = format!("amt_{}", hex::encode(rand::random::<[u8; 32]>()));
        let token = ScopedToken {
            name: name.clone(),
            prefixes: body.prefixes,
            read_only: body.read_only,
            created_at,
            expires_at,
            hash: hash_of(secret.as_bytes()),
        };
        let mut by_hash = self.by_hash.write().unwrap_or_else(|e| e.into_inner());
        if by_hash.values().any(|t| t.name == name) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "token_exists",
                format!("a token named {name} exists; revoke it first"),
            ));
        }
        if by_hash.len() >= TOKENS_MAX {
            return Err(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "too_many_tokens",
                format!("the node holds {TOKENS_MAX} tokens, as many as it may"),
            ));
        }
        let value = serde_json::to_vec(&token).map_err(|e| ApiError::internal(e.to_string()))?;
        self.store
            .commit(vec![Write::PutMeta {
                key: format!("{META_PREFIX}{name}"),
                value,
            }])
            .map_err(|e| ApiError::internal(format!("storing the token failed: {e}")))?;
        let token = Arc::new(token);
        by_hash.insert(token.hash.clone(), token.clone());
        Ok((secret, token))
    }

    /// Revokes the token `name`; false when there is none.
    fn revoke(&self, name: &str) -> Result<bool, ApiError> {
        let mut by_hash = self.by_hash.write().unwrap_or_else(|e| e.into_inner());
        let Some(hash) = by_hash
            .iter()
            .find(|(_, t)| t.name == name)
            .map(|(h, _)| h.clone())
        else {
            return Ok(false);
        };
        self.store
            .commit(vec![Write::DeleteMeta {
                key: format!("{META_PREFIX}{name}"),
            }])
            .map_err(|e| ApiError::internal(format!("revoking the token failed: {e}")))?;
        by_hash.remove(&hash);
        Ok(true)
    }
}

/// Body of `POST /v1/tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    name: String,
    prefixes: Vec<String>,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    expires_in_s: Option<u64>,
}

/// `POST /v1/tokens` → 201 with the token, shown this once.
pub(crate) async fn create(
    State(state): State<ApiState>,
    JsonBody(body): JsonBody<CreateBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let tokens = state.tokens.clone();
    let (secret, token) = super::docs::blocking(move || tokens.create(body)).await?;
    let mut view = token.view();
    view["token"] = json!(secret);
    Ok((StatusCode::CREATED, Json(view)))
}

/// `GET /v1/tokens`.
pub(crate) async fn list(State(state): State<ApiState>) -> Json<Value> {
    let tokens: Vec<Value> = state.tokens.list().iter().map(|t| t.view()).collect();
    Json(json!({ "tokens": tokens }))
}

/// `DELETE /v1/tokens/{name}`.
pub(crate) async fn revoke(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let tokens = state.tokens.clone();
    let revoking = name.clone();
    if super::docs::blocking(move || tokens.revoke(&revoking)).await? {
        Ok(Json(json!({ "revoked": name })))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "token_not_found",
            format!("no token named {name}"),
        ))
    }
}
