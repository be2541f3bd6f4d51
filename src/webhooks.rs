//! Webhooks for ended jobs, per the Standard Webhooks specification (PROTOCOL §10).
//!
//! - A tenant's signing secret (`POST /admin/webhook-secrets`) is 32 random bytes, shown once as
//!   `whsec_<base64>` and kept in the store (signing needs the key itself); asking again
//!   replaces it.
//! - A delivery is `POST <url>` with the JSON `{"type", "timestamp", "data": <the job>}` and
//!   the headers `webhook-id` (the same on every attempt), `webhook-timestamp` (Unix seconds of
//!   the attempt) and `webhook-signature` (`v1,` + base64 of HMAC-SHA256 of
//!   `"{id}.{timestamp}.{body}"`).
//! - A delivery that gets no 2xx is tried again after 1 s, doubling up to an hour between
//!   attempts (with ±20 % jitter), for at least a day; every attempt is recorded on the job.
//!   Redirects are not followed.
//! - URLs whose host is (or resolves to) a loopback, private, link-local or otherwise local
//!   address are refused, at submission and again at each delivery (DNS can change), unless
//!   `[jobs] allow_private_webhooks = true`.

use std::net::IpAddr;
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;

use crate::error::ApiError;

/// The prefix of a secret as shown.
pub const SECRET_PREFIX: &str = "whsec_";
/// First retry after this; doubled each time, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(3_600);
/// Deliveries are tried for at least this long.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(26 * 3_600);

/// A new secret: its bytes, and the text shown once.
pub fn new_secret() -> (Vec<u8>, String) {
    let bytes: [u8; 32] = rand::thread_rng().gen();
    let shown = format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    );
    (bytes.to_vec(), shown)
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length: this cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// The wait before attempt `n` (1 = the first retry): 1 s doubling to an hour, ±20 %.
pub fn backoff(n: u32) -> Duration {
    let base = FIRST_BACKOFF
        .saturating_mul(2u32.saturating_pow(n.saturating_sub(1).min(20)))
        .min(MAX_BACKOFF);
    base.mul_f64(rand::thread_rng().gen_range(0.8..1.2))
}

/// Whether an address is one a webhook may not reach by default.
pub fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                // 100.64.0.0/10, carrier-grade NAT.
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                // fc00::/7 unique local, fe80::/10 link-local.
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| is_local(IpAddr::V4(v4)))
        }
    }
}

/// Checks a webhook URL: http(s), a host, and (unless allowed) no local address.
///
/// # Errors
/// `bad_request` naming what is wrong.
pub async fn check_url(url: &str, allow_private: bool) -> Result<(), ApiError> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| ApiError::bad_request(format!("webhook.url: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ApiError::bad_request("webhook.url: must be http or https"));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| ApiError::bad_request("webhook.url: has no host"))?;
    if allow_private {
        return Ok(());
    }
    let port = parsed.port_or_known_default().unwrap_or(443);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<IpAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((bare, port))
            .await
            .map_err(|_| ApiError::bad_request(format!("webhook.url: {host} does not resolve")))?
            .map(|a| a.ip())
            .collect(),
    };
    if addrs.is_empty() || addrs.into_iter().any(is_local) {
        return Err(ApiError::bad_request(format!(
            "webhook.url: {host} is a loopback, private or link-local address (refused unless [jobs] allow_private_webhooks = true)"
        )));
    }
    Ok(())
}

/// Makes one delivery attempt of job `id`'s webhook (its due entry was taken, and left due
/// again at `lease_ms`), records it on the job, and schedules the next if it failed.
///
/// # Errors
/// Storage failures (the lease makes the delivery due again).
pub async fn attempt(
    state: &crate::server::AppState,
    client: &reqwest::Client,
    id: &str,
    lease_ms: i64,
) -> Result<(), ApiError> {
    let store = state.store();
    let Some((job, _)) = store.job_raw(id)? else {
        store.webhook_not_due(id, lease_ms)?;
        return Ok(());
    };
    let Some(hook) = job.webhook.clone().filter(|w| !w.done) else {
        store.webhook_not_due(id, lease_ms)?;
        return Ok(());
    };
    let kind = match job.status {
        crate::store::JobStatus::Succeeded => "job.succeeded",
        _ => "job.failed",
    };
    let now = chrono::Utc::now();
    let body = serde_json::to_vec(&serde_json::json!({
        "type": kind,
        "timestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "data": crate::server::http::jobs::job_json(&job),
    }))
    .map_err(|_| ApiError::internal())?;
    let ts = now.timestamp();
    let outcome = match (
        store.webhook_secret(&job.tenant)?,
        check_url(&hook.url, state.config.jobs.allow_private_webhooks).await,
    ) {
        (None, _) => Err("the tenant's signing secret is gone".to_owned()),
        (_, Err(e)) => Err(e.message),
        (Some(key), Ok(())) => client
            .post(&hook.url)
            .header("content-type", "application/json")
            .header("webhook-id", &hook.msg_id)
            .header("webhook-timestamp", ts.to_string())
            .header(
                "webhook-signature",
                signature(&key, &hook.msg_id, ts, &body),
            )
            .body(body)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| e.without_url().to_string()),
    };
    let delivery = crate::store::Delivery {
        at: ts,
        status: outcome.as_ref().ok().copied(),
        error: outcome.as_ref().err().cloned(),
    };
    let delivered = matches!(outcome, Ok(200..=299));
    let tries = u32::try_from(hook.deliveries.len() + 1).unwrap_or(u32::MAX);
    let first = hook.first_ms.unwrap_or(now.timestamp_millis());
    let next_ms =
        now.timestamp_millis() + i64::try_from(backoff(tries).as_millis()).unwrap_or(i64::MAX / 2);
    let give_up = next_ms - first > i64::try_from(GIVE_UP_AFTER.as_millis()).unwrap_or(i64::MAX);
    loop {
        let Some((mut job, raw)) = store.job_raw(id)? else {
            break;
        };
        let Some(w) = job.webhook.as_mut() else { break };
        w.deliveries.push(delivery.clone());
        w.done = delivered || give_up;
        if store.swap_job(&raw, &job).await? {
            break;
        }
    }
    if !(delivered || give_up) {
        store.webhook_due(id, next_ms)?;
    }
    store.webhook_not_due(id, lease_ms)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_specification_example() {
        // The specification's own example (standard-webhooks, "Verifying webhook signatures").
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap(); // ok: test code
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn local_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "100.64.0.1",
        ] {
            assert!(is_local(ip.parse().unwrap()), "{ip}"); // ok: test code
        }
        for ip in ["93.184.216.34", "2606:4700::1111", "8.8.8.8"] {
            assert!(!is_local(ip.parse().unwrap()), "{ip}"); // ok: test code
        }
    }

    #[test]
    fn backoff_doubles_to_an_hour() {
        assert!(
            backoff(1) >= Duration::from_millis(800) && backoff(1) <= Duration::from_millis(1200)
        );
        assert!(
            backoff(3) >= Duration::from_millis(3200) && backoff(3) <= Duration::from_millis(4800)
        );
        assert!(backoff(40) <= Duration::from_secs(4320));
    }
}
