//! The admin HTTP API: routes, bearer-token check, and JSON documents
//! (`docs/ADMIN_API.md` is the reference; `docs/admin-api.openapi.yaml` the
//! machine-readable form).
//!
//! Adding an endpoint: write a handler `fn(&AdminState, &Request, &[String]) ->
//! Response` (the slice holds the path parameters) and add one line to
//! [`ROUTES`]. If it needs shard state, add a [`Query`] variant, an `Engine`
//! method answering it (`shard/src/engine/admin.rs`) and its arm in
//! `ShardCall::answer`. Every route but `/health` and `/ready` requires the
//! token when one is configured.

use std::time::Instant;

use serde_json::{Value, json};
use tessera_shard::admin::{
    PAGE_LIMIT_MAX, RetainedFilter, RetainedInfo, SessionDetail, SessionFilter, SessionInfo,
    SubscriptionFilter, SubscriptionInfo,
};
use tessera_shard::hash::shard_for;

use super::http::{Request, Response};
use super::metrics::Exporter;
use super::shard_call::{Answer, CallError, Query, ShardLinks};

/// Items per page when the request does not say.
pub const PAGE_LIMIT_DEFAULT: usize = 100;

/// Longest kick reason accepted, bytes.
pub const KICK_REASON_BYTES_MAX: usize = 256;

/// What the handlers share.
#[derive(Debug)]
pub struct AdminState {
    /// The shards' admin channels and liveness flags.
    pub links: ShardLinks,
    /// The metrics exporter.
    pub exporter: Exporter,
    /// The bearer token, if one is required.
    pub token: Option<String>,
    /// When the broker started.
    pub started: Instant,
    /// The security files, for the ban endpoints (`docs/SECURITY.md`).
    pub auth: Option<std::sync::Arc<crate::auth::AuthHub>>,
    /// The control thread, when the node runs in a cluster.
    pub cluster: Option<std::sync::Arc<crate::cluster::ClusterNode>>,
    /// The bridges (`/api/v1/bridges`, bridge metrics).
    pub bridges: Option<std::sync::Arc<crate::bridge::BridgeHub>>,
    /// Every listener's kind and URL, by listener id (the `transport` and
    /// `listener` of a connected client).
    pub listeners: Vec<(crate::config::ListenerKind, String)>,
}

type Handler = fn(&AdminState, &Request, &[String]) -> Response;

/// One route: method, path pattern (`{}` is a parameter, one segment),
/// whether it is served without the token, and its handler.
struct Route {
    method: &'static str,
    path: &'static [&'static str],
    public: bool,
    handler: Handler,
}

const fn route(method: &'static str, path: &'static [&'static str], handler: Handler) -> Route {
    Route {
        method,
        path,
        public: false,
        handler,
    }
}

/// Every endpoint. Keep `docs/ADMIN_API.md` and the OpenAPI file in step.
const ROUTES: &[Route] = &[
    Route {
        method: "GET",
        path: &["health"],
        public: true,
        handler: health,
    },
    Route {
        method: "GET",
        path: &["ready"],
        public: true,
        handler: ready,
    },
    route("GET", &["metrics"], metrics),
    route("GET", &["api", "v1", "status"], status),
    route("GET", &["api", "v1", "clients"], clients_list),
    route("GET", &["api", "v1", "clients", "{}"], session_show),
    route("DELETE", &["api", "v1", "clients", "{}"], client_kick),
    route("GET", &["api", "v1", "subscriptions"], subscriptions_list),
    route(
        "GET",
        &["api", "v1", "subscriptions", "{}"],
        subscriptions_of,
    ),
    route("GET", &["api", "v1", "retained"], retained_list),
    route("GET", &["api", "v1", "retained", "{}"], retained_get),
    route("DELETE", &["api", "v1", "retained", "{}"], retained_delete),
    route("GET", &["api", "v1", "sessions"], sessions_list),
    route("GET", &["api", "v1", "sessions", "{}"], session_show),
    route("DELETE", &["api", "v1", "sessions", "{}"], session_expire),
    route("GET", &["api", "v1", "bans"], bans_list),
    route("POST", &["api", "v1", "bans"], bans_add),
    route("DELETE", &["api", "v1", "bans"], bans_delete),
    route("GET", &["api", "v1", "cluster"], super::cluster::status),
    route("GET", &["api", "v1", "bridges"], bridges_list),
    route(
        "POST",
        &["api", "v1", "cluster", "members"],
        super::cluster::join,
    ),
    route(
        "DELETE",
        &["api", "v1", "cluster", "members", "{}"],
        super::cluster::remove,
    ),
    route(
        "POST",
        &["api", "v1", "cluster", "leave"],
        super::cluster::leave,
    ),
    route(
        "POST",
        &["api", "v1", "cluster", "leader"],
        super::cluster::transfer_leader,
    ),
];

/// Answers one request.
pub fn handle(state: &AdminState, req: &Request) -> Response {
    let mut path_matched = false;
    for r in ROUTES {
        let Some(params) = match_path(r.path, &req.segments) else {
            continue;
        };
        path_matched = true;
        if r.method != req.method {
            continue;
        }
        if !r.public && !authorized(state.token.as_deref(), req.authorization.as_deref()) {
            let mut resp = Response::error(
                401,
                "unauthorized",
                "a valid bearer token is required (Authorization: Bearer TOKEN)",
            );
            resp.headers
                .push(("WWW-Authenticate", "Bearer realm=\"tessera\"".to_owned()));
            return resp;
        }
        return (r.handler)(state, req, &params);
    }
    if path_matched {
        Response::error(
            405,
            "method_not_allowed",
            format!("{} is not allowed here", req.method),
        )
    } else {
        Response::error(404, "not_found", "no such endpoint")
    }
}

fn match_path(pattern: &[&str], segments: &[String]) -> Option<Vec<String>> {
    if pattern.len() != segments.len() {
        return None;
    }
    let mut params = Vec::new();
    for (p, s) in pattern.iter().zip(segments) {
        if *p == "{}" {
            params.push(s.clone());
        } else if p != s {
            return None;
        }
    }
    Some(params)
}

/// Whether `header` carries the bearer `token`; compared in constant time
/// (for a given token length), so response timing does not reveal a prefix.
pub fn authorized(token: Option<&str>, header: Option<&str>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let Some(given) = header.and_then(|h| {
        let (scheme, rest) = h.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    }) else {
        return false;
    };
    constant_time_eq(token.as_bytes(), given.as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Walk the expected token's length whatever was given, so the time
    // depends on neither the content nor the length of the guess.
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        let y = b.get(i).copied().unwrap_or(!x);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

fn shard_error(e: CallError) -> Response {
    Response::error(503, "shard_unavailable", e.to_string())
}

fn unexpected() -> Response {
    Response::error(
        500,
        "internal",
        "a shard answered with the wrong kind of answer",
    )
}

// ---------------------------------------------------------------------------
// Health

fn health(_: &AdminState, _: &Request, _: &[String]) -> Response {
    Response::json(200, &json!({ "status": "ok" }))
}

fn ready(state: &AdminState, _: &Request, _: &[String]) -> Response {
    use std::sync::atomic::Ordering::SeqCst;
    let shards: Vec<Value> = state
        .links
        .status
        .iter()
        .enumerate()
        .map(|(k, s)| {
            json!({ "shard": k, "up": s.up.load(SeqCst), "recovered": s.recovered.load(SeqCst) })
        })
        .collect();
    let shards_ready = state
        .links
        .status
        .iter()
        .all(|s| s.up.load(SeqCst) && s.recovered.load(SeqCst));
    let Some(cluster) = &state.cluster else {
        return Response::json(
            if shards_ready { 200 } else { 503 },
            &json!({ "ready": shards_ready, "shards": shards }),
        );
    };
    // In a cluster the node is ready once it is a caught-up member that knows a leader.
    let member_ready = cluster
        .view(false, super::cluster::VIEW_TIMEOUT)
        .is_some_and(|v| v.status.ready);
    let ready = shards_ready && member_ready;
    Response::json(
        if ready { 200 } else { 503 },
        &json!({ "ready": ready, "shards": shards, "cluster_member_ready": member_ready }),
    )
}

fn metrics(state: &AdminState, _: &Request, _: &[String]) -> Response {
    Response {
        status: 200,
        content_type: "text/plain; version=0.0.4; charset=utf-8",
        headers: Vec::new(),
        body: {
            let mut text = state.exporter.render(&state.links);
            if let Some(view) = state
                .cluster
                .as_ref()
                .and_then(|c| c.view(false, super::cluster::VIEW_TIMEOUT))
            {
                super::cluster::render_metrics(&view, &mut text);
            }
            if let Some(hub) = &state.bridges {
                crate::bridge::render_metrics(hub, &mut text);
            }
            text.into_bytes()
        },
    }
}

/// `GET /api/v1/bridges`: every configured bridge with its state and counters.
fn bridges_list(state: &AdminState, _: &Request, _: &[String]) -> Response {
    match &state.bridges {
        Some(hub) => Response::json(200, &hub.json()),
        None => Response::json(200, &json!({ "items": [] })),
    }
}

fn status(state: &AdminState, _: &Request, _: &[String]) -> Response {
    use std::sync::atomic::Ordering::SeqCst;
    let answered = state.exporter.refresh(&state.links);
    let snaps = state.exporter.snapshots();
    let mut shards = Vec::new();
    let (mut conns, mut online, mut offline, mut subs, mut queued, mut inflight) =
        (0, 0, 0, 0, 0, 0);
    let (mut published, mut delivered, mut dropped) = (0u64, 0u64, 0u64);
    let (mut retained, mut p99) = (0, 0);
    for (k, s) in snaps.iter().enumerate() {
        let up = answered[k] && state.links.status[k].up.load(SeqCst);
        let Some(s) = s else {
            shards.push(json!({ "shard": k, "up": false }));
            continue;
        };
        let g = &s.gauges;
        conns += s.connections_current;
        online += g.sessions_online;
        offline += g.sessions_offline;
        subs += g.subscriptions;
        queued += g.queued;
        inflight += g.inflight;
        retained = retained.max(g.retained);
        published += s.probe.published.iter().sum::<u64>();
        delivered += s.probe.delivered.iter().sum::<u64>();
        let st = &s.stats;
        dropped += st.dropped_queue_full
            + st.dropped_expired
            + st.dropped_too_large
            + st.dropped_shared_no_member
            + st.dropped_shared_qos2_member_ended;
        p99 = p99.max(s.probe.publish_to_deliver_p99_us);
        shards.push(json!({
            "shard": k,
            "up": up,
            "connections": s.connections_current,
            "sessions_online": g.sessions_online,
            "sessions_offline": g.sessions_offline,
            "subscriptions": g.subscriptions,
            "queued": g.queued,
            "inflight": g.inflight,
            "route_filters": g.route_filters,
            "publish_to_deliver_p50_us": s.probe.publish_to_deliver_p50_us,
            "publish_to_deliver_p99_us": s.probe.publish_to_deliver_p99_us,
        }));
    }
    Response::json(
        200,
        &json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": state.started.elapsed().as_secs(),
            "shard_count": state.links.shard_count(),
            "shards_up": answered.iter().filter(|a| **a).count(),
            "connections": conns,
            "sessions_online": online,
            "sessions_offline": offline,
            "subscriptions": subs,
            "retained": retained,
            "queued": queued,
            "inflight": inflight,
            "messages_published": published,
            "messages_delivered": delivered,
            "messages_dropped": dropped,
            "publish_to_deliver_p99_us": p99,
            "shards": shards,
        }),
    )
}

// ---------------------------------------------------------------------------
// Paging

struct PageParams {
    limit: usize,
    after: Option<String>,
}

fn page_params(req: &Request) -> Result<PageParams, Response> {
    let limit = match req.param("limit") {
        None => PAGE_LIMIT_DEFAULT,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=PAGE_LIMIT_MAX).contains(&n) => n,
            _ => {
                return Err(Response::error(
                    400,
                    "bad_parameter",
                    format!("limit must be an integer from 1 to {PAGE_LIMIT_MAX}, not {v:?}"),
                ));
            }
        },
    };
    let after = req
        .param("after")
        .filter(|a| !a.is_empty())
        .map(str::to_owned);
    Ok(PageParams { limit, after })
}

fn bool_param(req: &Request, name: &str) -> Result<Option<bool>, Response> {
    match req.param(name) {
        None | Some("") => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(v) => Err(Response::error(
            400,
            "bad_parameter",
            format!("{name} must be true or false, not {v:?}"),
        )),
    }
}

/// Merges the shards' pages (each sorted by key) into one page of `limit`. In a
/// cluster each item names this node (`node`), so listings of several members can be
/// put together (`brokerctl ... list` does).
fn merge_pages<T>(
    state: &AdminState,
    pages: Vec<(Vec<T>, usize)>,
    limit: usize,
    key: impl Fn(&T) -> String,
    to_json: impl Fn(&T) -> Value,
) -> Response {
    let node = state.cluster.as_deref().map(|c| c.node_id());
    let to_json = |i: &T| {
        let mut v = to_json(i);
        if let (Some(n), Value::Object(o)) = (node, &mut v) {
            o.insert("node".into(), Value::from(n));
        }
        v
    };
    let total: usize = pages.iter().map(|(_, t)| t).sum();
    let mut items: Vec<T> = pages.into_iter().flat_map(|(i, _)| i).collect();
    items.sort_by_key(|i| key(i));
    let more = items.len() > limit;
    items.truncate(limit);
    let next = if more { items.last().map(&key) } else { None };
    Response::json(
        200,
        &json!({
            "items": items.iter().map(to_json).collect::<Vec<_>>(),
            "total": total,
            "next": next,
        }),
    )
}

// ---------------------------------------------------------------------------
// Clients and sessions

fn session_json(state: &AdminState, s: &SessionInfo) -> Value {
    let listener = s.listener.and_then(|l| state.listeners.get(usize::from(l)));
    json!({
        "client_id": s.client_id,
        "shard": s.shard,
        "connected": s.connected,
        "transport": listener.map(|(kind, _)| kind.to_string()),
        "listener": listener.map(|(_, url)| url),
        "protocol": s.protocol,
        "keep_alive_s": s.keep_alive_s,
        "session_expiry_interval_s": s.expiry_interval_s,
        "disconnected_for_s": s.disconnected_for_s,
        "expires_in_s": s.expires_in_s,
        "subscriptions": s.subscriptions,
        "inflight": s.inflight,
        "queued": s.queued,
    })
}

fn sessions_page(state: &AdminState, req: &Request, connected: Option<bool>) -> Response {
    let page = match page_params(req) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let filter = SessionFilter {
        prefix: req
            .param("prefix")
            .filter(|p| !p.is_empty())
            .map(str::to_owned),
        connected,
        // One more than the page: tells whether there is a next page.
        limit: page.limit + 1,
        after: page.after,
    };
    let mut pages = Vec::new();
    for a in state.links.call_all(&Query::Sessions(filter)) {
        match a {
            Ok(Answer::Sessions(p)) => pages.push((p.items, p.total)),
            Ok(_) => return unexpected(),
            Err(e) => return shard_error(e),
        }
    }
    merge_pages(
        state,
        pages,
        page.limit,
        |s| s.client_id.clone(),
        |s| session_json(state, s),
    )
}

fn clients_list(state: &AdminState, req: &Request, _: &[String]) -> Response {
    sessions_page(state, req, Some(true))
}

fn sessions_list(state: &AdminState, req: &Request, _: &[String]) -> Response {
    match bool_param(req, "connected") {
        Ok(c) => sessions_page(state, req, c),
        Err(r) => r,
    }
}

fn owner(state: &AdminState, client_id: &str) -> usize {
    shard_for(client_id.as_bytes(), state.links.shard_count())
}

fn session_detail(state: &AdminState, client_id: &str) -> Result<SessionDetail, Response> {
    match state.links.call(
        owner(state, client_id),
        Query::Session(client_id.to_owned()),
    ) {
        Ok(Answer::Session(Some(d))) => Ok(*d),
        Ok(Answer::Session(None)) => Err(Response::error(
            404,
            "not_found",
            format!("no session for client {client_id:?}"),
        )),
        Ok(_) => Err(unexpected()),
        Err(e) => Err(shard_error(e)),
    }
}

fn session_show(state: &AdminState, _: &Request, p: &[String]) -> Response {
    match session_detail(state, &p[0]) {
        Ok(d) => {
            let mut v = session_json(state, &d.info);
            v["has_will"] = json!(d.has_will);
            v["subscription_list"] = d.subscriptions.iter().map(subscription_json).collect();
            Response::json(200, &v)
        }
        Err(r) => r,
    }
}

fn client_kick(state: &AdminState, req: &Request, p: &[String]) -> Response {
    let reason = req.param("reason").filter(|r| !r.is_empty());
    if reason.is_some_and(|r| r.len() > KICK_REASON_BYTES_MAX || r.contains('\0')) {
        return Response::error(
            400,
            "bad_parameter",
            format!("reason must be at most {KICK_REASON_BYTES_MAX} bytes, without NUL"),
        );
    }
    let client_id = &p[0];
    let q = Query::Kick {
        client_id: client_id.clone(),
        reason: reason.map(str::to_owned),
    };
    match state.links.call(owner(state, client_id), q) {
        Ok(Answer::Done(true)) => Response::json(
            200,
            &json!({ "kicked": client_id, "reason_code": "0x98", "reason": reason }),
        ),
        Ok(Answer::Done(false)) => Response::error(
            404,
            "not_found",
            format!("no connected client {client_id:?}"),
        ),
        Ok(_) => unexpected(),
        Err(e) => shard_error(e),
    }
}

/// `GET /api/v1/bans`: the ban list in force.
fn bans_list(state: &AdminState, _: &Request, _: &[String]) -> Response {
    let Some(auth) = &state.auth else {
        return Response::json(200, &json!({ "bans": [] }));
    };
    let bans: Vec<Value> = auth
        .bans()
        .iter()
        .map(|b| {
            let text = b.to_string();
            let (kind, value) = text.split_once(' ').unwrap_or((&text, ""));
            json!({ "kind": kind, "value": value })
        })
        .collect();
    Response::json(200, &json!({ "bans": bans }))
}

/// `POST /api/v1/bans?kind=K&value=V` and `DELETE` the same: edit the ban
/// file (`auth.ban_file`) and reload it; connected clients the new list bans
/// are disconnected by their shards.
fn bans_edit(state: &AdminState, req: &Request, add: bool) -> Response {
    let (Some(kind), Some(value)) = (req.param("kind"), req.param("value")) else {
        return Response::error(
            400,
            "bad_parameter",
            "kind (clientid, username or ip) and value are required",
        );
    };
    let ban: crate::auth::bans::Ban = match format!("{kind} {value}").parse() {
        Ok(b) => b,
        Err(e) => return Response::error(400, "bad_parameter", e),
    };
    let Some(auth) = &state.auth else {
        return Response::error(409, "no_ban_file", "set auth.ban_file to manage bans");
    };
    match auth.edit_ban(ban.clone(), add) {
        Ok(changed) if add => Response::json(
            if changed { 201 } else { 200 },
            &json!({ "banned": ban.to_string(), "added": changed }),
        ),
        Ok(true) => Response::json(200, &json!({ "unbanned": ban.to_string() })),
        Ok(false) => Response::error(404, "not_found", format!("no ban {ban}")),
        Err(e) => Response::error(409, "no_ban_file", e),
    }
}

fn bans_add(state: &AdminState, req: &Request, _: &[String]) -> Response {
    bans_edit(state, req, true)
}

fn bans_delete(state: &AdminState, req: &Request, _: &[String]) -> Response {
    bans_edit(state, req, false)
}

fn session_expire(state: &AdminState, _: &Request, p: &[String]) -> Response {
    let client_id = &p[0];
    match state
        .links
        .call(owner(state, client_id), Query::Expire(client_id.clone()))
    {
        Ok(Answer::Done(true)) => Response::json(200, &json!({ "expired": client_id })),
        Ok(Answer::Done(false)) => Response::error(
            404,
            "not_found",
            format!("no session for client {client_id:?}"),
        ),
        Ok(_) => unexpected(),
        Err(e) => shard_error(e),
    }
}

// ---------------------------------------------------------------------------
// Subscriptions

/// Separates ClientID and filter in a subscription cursor: NUL, which MQTT
/// strings may not contain [MQTT-1.5.4-2].
const CURSOR_SEPARATOR: char = '\0';

fn subscription_json(s: &SubscriptionInfo) -> Value {
    json!({
        "client_id": s.client_id,
        "filter": s.filter,
        "qos": s.qos,
        "no_local": s.no_local,
        "retain_as_published": s.retain_as_published,
        "retain_handling": s.retain_handling,
        "subscription_id": s.subscription_id,
    })
}

fn subscriptions_list(state: &AdminState, req: &Request, _: &[String]) -> Response {
    let page = match page_params(req) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let client_id = req.param("client_id").filter(|c| !c.is_empty());
    let after = page.after.map(|a| match a.split_once(CURSOR_SEPARATOR) {
        Some((c, f)) => (c.to_owned(), f.to_owned()),
        None => (a, String::new()),
    });
    let filter = SubscriptionFilter {
        client_id: client_id.map(str::to_owned),
        filter_contains: req
            .param("filter")
            .filter(|f| !f.is_empty())
            .map(str::to_owned),
        after,
        limit: page.limit + 1,
    };
    let answers = match client_id {
        Some(id) => vec![
            state
                .links
                .call(owner(state, id), Query::Subscriptions(filter)),
        ],
        None => state.links.call_all(&Query::Subscriptions(filter)),
    };
    let mut pages = Vec::new();
    for a in answers {
        match a {
            Ok(Answer::Subscriptions(p)) => pages.push((p.items, p.total)),
            Ok(_) => return unexpected(),
            Err(e) => return shard_error(e),
        }
    }
    merge_pages(
        state,
        pages,
        page.limit,
        |s| format!("{}{CURSOR_SEPARATOR}{}", s.client_id, s.filter),
        subscription_json,
    )
}

fn subscriptions_of(state: &AdminState, _: &Request, p: &[String]) -> Response {
    match session_detail(state, &p[0]) {
        Ok(d) => Response::json(
            200,
            &json!({
                "client_id": p[0],
                "items": d.subscriptions.iter().map(subscription_json).collect::<Vec<_>>(),
                "total": d.subscriptions.len(),
            }),
        ),
        Err(r) => r,
    }
}

// ---------------------------------------------------------------------------
// Retained messages (replicated on every shard: shard 0 answers)

fn retained_json(r: &RetainedInfo) -> Value {
    json!({
        "topic": r.topic,
        "qos": r.qos,
        "payload_bytes": r.payload.len(),
        "payload": std::str::from_utf8(&r.payload).ok(),
        "payload_base64": base64(&r.payload),
        "expires_in_s": r.expires_in_s,
    })
}

fn retained_list(state: &AdminState, req: &Request, _: &[String]) -> Response {
    let page = match page_params(req) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let topic_filter = req.param("filter").filter(|f| !f.is_empty());
    if let Some(f) = topic_filter
        && tessera_proto::topic::validate_topic_filter(f, tessera_proto::topic::TOPIC_LEVELS_MAX)
            .is_err()
    {
        return Response::error(
            400,
            "bad_parameter",
            format!("filter {f:?} is not a valid MQTT topic filter"),
        );
    }
    let filter = RetainedFilter {
        topic_filter: topic_filter.map(str::to_owned),
        after: page.after,
        limit: page.limit + 1,
    };
    match state.links.call(0, Query::Retained(filter)) {
        Ok(Answer::Retained(p)) => merge_pages(
            state,
            vec![(p.items, p.total)],
            page.limit,
            |r| r.topic.clone(),
            retained_json,
        ),
        Ok(_) => unexpected(),
        Err(e) => shard_error(e),
    }
}

fn retained_get(state: &AdminState, _: &Request, p: &[String]) -> Response {
    match state.links.call(0, Query::RetainedGet(p[0].clone())) {
        Ok(Answer::RetainedOne(Some(r))) => Response::json(200, &retained_json(&r)),
        Ok(Answer::RetainedOne(None)) => Response::error(
            404,
            "not_found",
            format!("no retained message on topic {:?}", p[0]),
        ),
        Ok(_) => unexpected(),
        Err(e) => shard_error(e),
    }
}

fn retained_delete(state: &AdminState, _: &Request, p: &[String]) -> Response {
    match state.links.call(0, Query::RetainedDelete(p[0].clone())) {
        Ok(Answer::Done(true)) => Response::json(200, &json!({ "deleted": p[0] })),
        Ok(Answer::Done(false)) => Response::error(
            404,
            "not_found",
            format!("no retained message on topic {:?}", p[0]),
        ),
        Ok(_) => unexpected(),
        Err(e) => shard_error(e),
    }
}

/// Standard base64 with padding (RFC 4648 section 4).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(authorized(None, None));
        assert!(authorized(
            Some("s3cret-token"),
            Some("Bearer s3cret-token")
        ));
        assert!(authorized(
            Some("s3cret-token"),
            Some("bearer  s3cret-token")
        ));
        assert!(!authorized(Some("s3cret-token"), None));
        assert!(!authorized(
            Some("s3cret-token"),
            Some("Bearer s3cret-tokeN")
        ));
        assert!(!authorized(
            Some("s3cret-token"),
            Some("Bearer s3cret-token2")
        ));
        assert!(!authorized(Some("s3cret-token"), Some("Bearer s3cret")));
        assert!(!authorized(
            Some("s3cret-token"),
            Some("Basic s3cret-token")
        ));
        assert!(!authorized(Some("s3cret-token"), Some("Bearer ")));
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn every_route_is_in_the_openapi_file() {
        let spec = include_str!("../../../docs/admin-api.openapi.yaml");
        let paths: Vec<Vec<&str>> = spec
            .lines()
            .filter_map(|l| l.strip_prefix("  /")?.strip_suffix(':'))
            .map(|p| p.split('/').collect())
            .collect();
        for r in ROUTES {
            let found = paths.iter().any(|p| {
                p.len() == r.path.len()
                    && p.iter()
                        .zip(r.path)
                        .all(|(s, r)| s == r || (*r == "{}" && s.starts_with('{')))
            });
            assert!(
                found,
                "{} /{} is not in the OpenAPI file",
                r.method,
                r.path.join("/")
            );
        }
        assert_eq!(paths.len(), 19, "a path in the OpenAPI file has no route");
    }

    #[test]
    fn paths_match_with_parameters() {
        let seg = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            match_path(
                &["api", "v1", "clients", "{}"],
                &seg(&["api", "v1", "clients", "a/b"])
            ),
            Some(vec!["a/b".to_owned()])
        );
        assert_eq!(
            match_path(&["api", "v1", "clients"], &seg(&["api", "v1"])),
            None
        );
    }
}
