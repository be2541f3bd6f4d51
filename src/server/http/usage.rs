//! Usage reports: `GET /v1/usage` (the caller's tenant) and `GET /admin/usage` (any tenant),
//! grouped by day, model, key or conversation, as JSON or, with `format=csv`, for export.

use actix_web::{web, HttpResponse};
use serde::Deserialize;

use crate::error::ApiError;
use crate::ids::TenantId;
use crate::server::auth::{Admin, Client};
use crate::server::AppState;
use crate::tenant::usage::{report_rows, to_csv, GroupBy, UsageRow};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    group_by: Option<GroupBy>,
    #[serde(default)]
    format: Option<String>,
}

pub async fn own(
    Client(p): Client,
    state: web::Data<AppState>,
    q: web::Query<UsageQuery>,
) -> Result<HttpResponse, ApiError> {
    if q.tenant.as_ref().is_some_and(|t| *t != p.tenant.0) {
        return Err(ApiError::bad_request(
            "tenant is implied by the key on /v1/usage",
        ));
    }
    report(state, Some(p.tenant), q.into_inner()).await
}

pub async fn admin(
    _: Admin,
    state: web::Data<AppState>,
    q: web::Query<UsageQuery>,
) -> Result<HttpResponse, ApiError> {
    let tenant = q.tenant.clone().map(TenantId);
    report(state, tenant, q.into_inner()).await
}

/// Folds the per-minute roll-ups into rows on the blocking pool: a report over months of
/// traffic holds one row per group, and never stalls an HTTP worker.
async fn report(
    state: web::Data<AppState>,
    tenant: Option<TenantId>,
    q: UsageQuery,
) -> Result<HttpResponse, ApiError> {
    let from = q.from.as_deref().map(parse_time).transpose()?.unwrap_or(0);
    let to =
        q.to.as_deref()
            .map(parse_time)
            .transpose()?
            .unwrap_or(i64::MAX);
    let group_by = q.group_by.unwrap_or(GroupBy::Day);
    let store = state.store().clone();
    let scan_tenant = tenant.clone();
    let rows = web::block(move || report_rows(&store, scan_tenant.as_ref(), from, to, group_by))
        .await
        .map_err(|_| ApiError::internal())??;
    let tenant = tenant.as_ref();
    match q.format.as_deref() {
        Some("csv") => Ok(HttpResponse::Ok()
            .content_type("text/csv; charset=utf-8")
            .body(to_csv(&rows))),
        None | Some("json") => {
            let total = total(&rows);
            Ok(HttpResponse::Ok().json(serde_json::json!({
                "object": "usage_report",
                "tenant": tenant,
                "group_by": group_by,
                "data": rows,
                "total": total,
            })))
        }
        Some(other) => Err(ApiError::bad_request(format!(
            "unknown format {other:?}: json or csv"
        ))),
    }
}

fn total(rows: &[UsageRow]) -> UsageRow {
    let mut t = UsageRow {
        group: "total".into(),
        ..UsageRow::default()
    };
    rows.iter().for_each(|r| t.add(r));
    t
}

/// A time as Unix seconds, `YYYY-MM-DD` (UTC midnight) or RFC 3339; answers milliseconds.
fn parse_time(s: &str) -> Result<i64, ApiError> {
    if let Ok(secs) = s.parse::<i64>() {
        return Ok(secs.saturating_mul(1000));
    }
    if let Ok(date) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        if let Some(t) = date.and_hms_opt(0, 0, 0) {
            return Ok(t.and_utc().timestamp_millis());
        }
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|_| {
            ApiError::bad_request(format!(
                "invalid time {s:?}: Unix seconds, YYYY-MM-DD or RFC 3339"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(parse_time("86400").unwrap(), 86_400_000); // ok: test code
        assert_eq!(parse_time("1970-01-02").unwrap(), 86_400_000); // ok: test code
        assert_eq!(parse_time("1970-01-02T00:00:01Z").unwrap(), 86_401_000); // ok: test code
        assert!(parse_time("yesterday").is_err());
    }
}
