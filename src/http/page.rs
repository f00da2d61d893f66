//! `GET /`: the built-in page for people, and `GET /assets/{name}`: its
//! script, style and the vendored chart library (uPlot), all compiled into
//! the binary so the page works on a closed network.
//!
//! The page shows no count by itself: it reads `/v1/summary` and
//! `/v1/charts` with the token the person typed, so Read access is theirs
//! to enforce and the document itself is open, like `/healthz`.
//!
//! Caching: an asset's URL carries a digest of its bytes (`?v=…`), so a
//! browser may keep it for a year and a new build is fetched at once; the
//! document is revalidated on each load (`no-cache` with an `ETag`, so
//! that costs a 304 and no body).

use std::sync::LazyLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::http::error::Error;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(get_page))
        .route("/assets/{name}", get(get_asset))
}

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

static ASSETS: &[Asset] = &[
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("page/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("page/app.css"),
    },
    Asset {
        name: "uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("page/vendor/uplot/uPlot.iife.min.js"),
    },
    Asset {
        name: "uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("page/vendor/uplot/uPlot.min.css"),
    },
    Asset {
        name: "uPlot.LICENSE",
        content_type: "text/plain; charset=utf-8",
        body: include_bytes!("page/vendor/uplot/LICENSE"),
    },
];

const TEMPLATE: &str = include_str!("page/index.html");

/// 64-bit FNV-1a: a stable digest of an asset's bytes for its URL and
/// `ETag`. Not a security measure, only "did these bytes change".
fn digest(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The document with each `{{name}}` replaced by the asset's versioned URL,
/// and its own digest.
static PAGE: LazyLock<(String, String)> = LazyLock::new(|| {
    let mut html = TEMPLATE.to_owned();
    for asset in ASSETS {
        let url = format!("/assets/{}?v={}", asset.name, digest(asset.body));
        html = html.replace(&format!("{{{{{}}}}}", asset.name), &url);
    }
    let etag = format!("\"{}\"", digest(html.as_bytes()));
    (html, etag)
});

/// True when the request's `If-None-Match` names `etag` (or `*`).
fn fresh(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}

fn answer(
    headers: &HeaderMap,
    etag: &str,
    content_type: &'static str,
    cache: &'static str,
    body: Vec<u8>,
) -> Response {
    let mut response = if fresh(headers, etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        body.into_response()
    };
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if let Ok(etag) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, etag);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

async fn get_page(headers: HeaderMap) -> Response {
    let (html, etag) = &*PAGE;
    let mut response = answer(
        &headers,
        etag,
        "text/html; charset=utf-8",
        "no-cache",
        html.clone().into_bytes(),
    );
    let h = response.headers_mut();
    // Only this server's own files run; uPlot sizes its elements through
    // inline styles, hence 'unsafe-inline' for styles only.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    // The token typed into the page must not leave in a Referer.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

async fn get_asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return Error::NotFound(format!("no asset named `{name}`")).into_response();
    };
    let etag = format!("\"{}\"", digest(asset.body));
    answer(
        &headers,
        &etag,
        asset.content_type,
        "public, max-age=31536000, immutable",
        asset.body.to_vec(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_of_the_document_is_an_asset() {
        let (html, _) = &*PAGE;
        assert!(
            !html.contains("{{"),
            "an unknown placeholder is left in index.html"
        );
        for name in ["app.js", "app.css", "uPlot.iife.min.js", "uPlot.min.css"] {
            let url = format!("/assets/{name}?v=");
            assert!(html.contains(&url), "{name} is not referenced");
        }
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "the page must not load anything from elsewhere"
        );
    }

    #[test]
    fn digests_differ_with_content() {
        assert_eq!(digest(b"abc"), digest(b"abc"));
        assert_ne!(digest(b"abc"), digest(b"abd"));
        assert_eq!(digest(b""), "cbf29ce484222325");
    }

    #[test]
    fn if_none_match() {
        let mut h = HeaderMap::new();
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"x\", W/\"y\""),
        );
        assert!(fresh(&h, "\"x\""));
        assert!(fresh(&h, "\"y\""));
        assert!(!fresh(&h, "\"z\""));
        assert!(!fresh(&HeaderMap::new(), "\"x\""));
    }

    #[test]
    fn the_vendored_library_keeps_its_licence() {
        let licence = ASSETS
            .iter()
            .find(|a| a.name == "uPlot.LICENSE")
            .map(|a| a.body);
        assert!(licence.is_some_and(|l| l.starts_with(b"The MIT License")));
    }
}
