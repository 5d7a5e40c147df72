//! The CalDAV client (RFC 4791 over WebDAV, RFC 4918): one calendar collection, queried by
//! time range or UID, written one resource per event with preconditions (`If-None-Match: *`
//! to create, `If-Match` to replace).
//!
//! Errors say what went wrong in words the model can relay; they never carry the password,
//! the Authorization header or the server's URL.

use crate::config::Secret;
use chrono::{DateTime, Utc};
use reqwest::header::{CONTENT_TYPE, ETAG, IF_MATCH, IF_NONE_MATCH};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use std::time::Duration;

const DAV: &str = "DAV:";
const CALDAV: &str = "urn:ietf:params:xml:ns:caldav";
/// A REPORT larger than this is refused rather than held in memory.
const BODY_LIMIT: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CalDavError {
    #[error("cannot reach the calendar server: {0}")]
    Unreachable(String),
    #[error("the calendar server did not answer within {0}ms")]
    TimedOut(u64),
    #[error(
        "the calendar server refused the login ({0}): check tools.calendar.username and \
         password"
    )]
    Unauthorized(StatusCode),
    #[error("the calendar server does not allow this account to do that ({0})")]
    Forbidden(StatusCode),
    #[error(
        "the calendar does not exist on the server: create it, or set \
         tools.calendar.create_calendar_if_missing = true"
    )]
    NoCalendar,
    #[error("the calendar server failed: {0}")]
    Server(StatusCode),
    #[error("the calendar server answered {0} to {1}")]
    Unexpected(StatusCode, &'static str),
    #[error("the calendar server sent an unreadable answer: {0}")]
    BadAnswer(String),
    #[error("the event was changed or removed by someone else meanwhile: read it again and retry")]
    Changed,
}

/// One calendar object resource.
#[derive(Debug, Clone)]
pub struct Resource {
    pub href: Url,
    pub etag: Option<String>,
    pub ics: String,
}

/// What a create (`PUT` with `If-None-Match: *`) found.
#[derive(Debug)]
pub enum Created {
    New,
    /// Something already lives at that href (a repeated call).
    AlreadyThere,
    /// The server holds the UID at another href.
    UidElsewhere,
}

/// How to reach the collection.
pub struct Settings {
    pub url: Url,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub create_if_missing: bool,
    pub timeout: Duration,
}

pub struct CalDav {
    http: reqwest::Client,
    collection: Url,
    username: Option<String>,
    password: Option<Secret>,
    create_if_missing: bool,
    timeout_ms: u64,
    /// Set once the collection is known to exist (or was created).
    ready: tokio::sync::OnceCell<()>,
    report: Method,
    propfind: Method,
    mkcalendar: Method,
}

fn method(name: &str) -> Result<Method, String> {
    Method::from_bytes(name.as_bytes()).map_err(|e| format!("HTTP method {name}: {e}"))
}

impl CalDav {
    pub fn new(s: Settings) -> Result<Self, String> {
        let mut collection = s.url;
        if !collection.path().ends_with('/') {
            let path = format!("{}/", collection.path());
            collection.set_path(&path);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(s.timeout)
            .timeout(s.timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .use_rustls_tls()
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(CalDav {
            http,
            collection,
            username: s.username,
            password: s.password,
            create_if_missing: s.create_if_missing,
            timeout_ms: u64::try_from(s.timeout.as_millis()).unwrap_or(u64::MAX),
            ready: tokio::sync::OnceCell::new(),
            report: method("REPORT")?,
            propfind: method("PROPFIND")?,
            mkcalendar: method("MKCALENDAR")?,
        })
    }

    /// Where a new event named `file` (e.g. `<uid>.ics`) goes.
    pub fn href_for(&self, file: &str) -> Result<Url, CalDavError> {
        self.collection
            .join(file)
            .map_err(|e| CalDavError::BadAnswer(format!("bad resource name: {e}")))
    }

    fn request(&self, method: Method, url: &Url) -> RequestBuilder {
        let rb = self.http.request(method, url.clone());
        match (&self.username, &self.password) {
            (Some(user), pass) => rb.basic_auth(user, pass.as_ref().map(Secret::expose)),
            (None, _) => rb,
        }
    }

    async fn send(&self, rb: RequestBuilder) -> Result<Response, CalDavError> {
        rb.send().await.map_err(|e| self.network(e))
    }

    fn network(&self, e: reqwest::Error) -> CalDavError {
        if e.is_timeout() {
            return CalDavError::TimedOut(self.timeout_ms);
        }
        // The innermost cause ("Connection refused (os error 111)") says the most; the outer
        // layers would repeat the URL.
        let mut innermost: Option<&dyn std::error::Error> = None;
        let mut next = std::error::Error::source(&e);
        while let Some(cause) = next {
            innermost = Some(cause);
            next = cause.source();
        }
        let text = innermost.map(|c| c.to_string());
        let text = text.unwrap_or_else(|| e.without_url().to_string());
        CalDavError::Unreachable(text)
    }

    async fn body(&self, mut resp: Response) -> Result<String, CalDavError> {
        let mut buf = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.network(e))? {
            if buf.len() + chunk.len() > BODY_LIMIT {
                return Err(CalDavError::BadAnswer(format!(
                    "larger than {} MiB",
                    BODY_LIMIT / 1024 / 1024
                )));
            }
            buf.extend_from_slice(&chunk);
        }
        String::from_utf8(buf).map_err(|_| CalDavError::BadAnswer("not UTF-8".into()))
    }

    /// Creates the collection before first use when configured to (once per process; a
    /// failed attempt is tried again on the next call).
    async fn ready(&self) -> Result<(), CalDavError> {
        if !self.create_if_missing {
            return Ok(());
        }
        self.ready
            .get_or_try_init(|| async {
                let probe = self
                    .request(self.propfind.clone(), &self.collection)
                    .header("Depth", "0")
                    .header(CONTENT_TYPE, "application/xml; charset=utf-8")
                    .body(r#"<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:"><D:prop><D:resourcetype/></D:prop></D:propfind>"#);
                let status = self.send(probe).await?.status();
                match status {
                    StatusCode::MULTI_STATUS | StatusCode::OK => return Ok(()),
                    StatusCode::NOT_FOUND => {}
                    s => return Err(classify(s, "PROPFIND")),
                }
                let body = format!(
                    r#"<?xml version="1.0" encoding="utf-8"?><C:mkcalendar xmlns:D="{DAV}" xmlns:C="{CALDAV}"><D:set><D:prop><C:supported-calendar-component-set><C:comp name="VEVENT"/></C:supported-calendar-component-set></D:prop></D:set></C:mkcalendar>"#
                );
                let make = self
                    .request(self.mkcalendar.clone(), &self.collection)
                    .header(CONTENT_TYPE, "application/xml; charset=utf-8")
                    .body(body);
                let status = self.send(make).await?.status();
                match status {
                    s if s.is_success() => {
                        tracing::info!("created the calendar collection");
                        Ok(())
                    }
                    // Created meanwhile by someone else.
                    StatusCode::METHOD_NOT_ALLOWED => Ok(()),
                    s => Err(classify(s, "MKCALENDAR")),
                }
            })
            .await
            .map(|_| ())
    }

    async fn report(&self, body: String) -> Result<Vec<Resource>, CalDavError> {
        self.ready().await?;
        let rb = self
            .request(self.report.clone(), &self.collection)
            .header("Depth", "1")
            .header(CONTENT_TYPE, "application/xml; charset=utf-8")
            .body(body);
        let resp = self.send(rb).await?;
        match resp.status() {
            StatusCode::MULTI_STATUS | StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Err(CalDavError::NoCalendar),
            s => return Err(classify(s, "REPORT")),
        }
        let xml = self.body(resp).await?;
        parse_multistatus(&xml, &self.collection).map_err(CalDavError::BadAnswer)
    }

    /// Resources with a VEVENT that the server says overlaps `[from, to)` (recurrences
    /// included).
    pub async fn query_range(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<Resource>, CalDavError> {
        let f = |t: DateTime<Utc>| t.format("%Y%m%dT%H%M%SZ").to_string();
        self.report(query_body(&format!(
            r#"<C:time-range start="{}" end="{}"/>"#,
            f(from),
            f(to)
        )))
        .await
    }

    /// The resource holding the event with this UID, wherever it lives in the collection.
    pub async fn find_uid(&self, uid: &str) -> Result<Option<Resource>, CalDavError> {
        let found = self
            .report(query_body(&format!(
                r#"<C:prop-filter name="UID"><C:text-match collation="i;octet">{}</C:text-match></C:prop-filter>"#,
                xml_escape(uid)
            )))
            .await?;
        // Servers may match loosely (Radicale: case-insensitive substring): check exactly.
        Ok(found.into_iter().find(|r| resource_has_uid(&r.ics, uid)))
    }

    pub async fn get(&self, href: &Url) -> Result<Option<Resource>, CalDavError> {
        self.ready().await?;
        let resp = self.send(self.request(Method::GET, href)).await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND | StatusCode::GONE => return Ok(None),
            s => return Err(classify(s, "GET")),
        }
        let etag = etag_of(&resp);
        let ics = self.body(resp).await?;
        Ok(Some(Resource {
            href: href.clone(),
            etag,
            ics,
        }))
    }

    /// Creates a resource only if nothing lives at `href` yet.
    pub async fn create(&self, href: &Url, ics: String) -> Result<Created, CalDavError> {
        self.ready().await?;
        let rb = self
            .request(Method::PUT, href)
            .header(IF_NONE_MATCH, "*")
            .header(CONTENT_TYPE, "text/calendar; charset=utf-8")
            .body(ics);
        let resp = self.send(rb).await?;
        match resp.status() {
            s if s.is_success() => Ok(Created::New),
            StatusCode::PRECONDITION_FAILED => Ok(Created::AlreadyThere),
            StatusCode::CONFLICT | StatusCode::FORBIDDEN => {
                let body = self.body(resp).await.unwrap_or_default();
                if body.contains("no-uid-conflict") {
                    Ok(Created::UidElsewhere)
                } else if body.contains("supported-calendar") || body.contains("valid-calendar") {
                    Err(CalDavError::BadAnswer(
                        "the server refused the event's iCalendar data".into(),
                    ))
                } else {
                    // RFC 4918: 409 when the parent collection does not exist.
                    Err(CalDavError::NoCalendar)
                }
            }
            StatusCode::NOT_FOUND => Err(CalDavError::NoCalendar),
            s => Err(classify(s, "PUT")),
        }
    }

    /// Replaces a resource if it is still the version `etag` names.
    pub async fn replace(
        &self,
        href: &Url,
        ics: String,
        etag: Option<&str>,
    ) -> Result<(), CalDavError> {
        self.ready().await?;
        let mut rb = self
            .request(Method::PUT, href)
            .header(CONTENT_TYPE, "text/calendar; charset=utf-8")
            .body(ics);
        if let Some(tag) = etag {
            rb = rb.header(IF_MATCH, tag);
        }
        let resp = self.send(rb).await?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            StatusCode::PRECONDITION_FAILED | StatusCode::NOT_FOUND => Err(CalDavError::Changed),
            s => Err(classify(s, "PUT")),
        }
    }

    /// Deletes a resource; `false` if it was not there.
    pub async fn delete(&self, href: &Url, etag: Option<&str>) -> Result<bool, CalDavError> {
        self.ready().await?;
        let mut rb = self.request(Method::DELETE, href);
        if let Some(tag) = etag {
            rb = rb.header(IF_MATCH, tag);
        }
        let resp = self.send(rb).await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(false),
            StatusCode::PRECONDITION_FAILED => Err(CalDavError::Changed),
            s => Err(classify(s, "DELETE")),
        }
    }
}

/// A status the request did not expect, in the model's words.
fn classify(status: StatusCode, what: &'static str) -> CalDavError {
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::PROXY_AUTHENTICATION_REQUIRED => {
            CalDavError::Unauthorized(status)
        }
        StatusCode::FORBIDDEN => CalDavError::Forbidden(status),
        s if s.is_server_error() => CalDavError::Server(s),
        s => CalDavError::Unexpected(s, what),
    }
}

fn etag_of(resp: &Response) -> Option<String> {
    resp.headers()
        .get(ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn query_body(filter: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?><C:calendar-query xmlns:D="{DAV}" xmlns:C="{CALDAV}"><D:prop><D:getetag/><C:calendar-data/></D:prop><C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT">{filter}</C:comp-filter></C:comp-filter></C:filter></C:calendar-query>"#
    )
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Does the iCalendar text hold a component with exactly this UID? (Cheap: a line scan.)
fn resource_has_uid(ics: &str, uid: &str) -> bool {
    let unfolded = ics.replace("\r\n ", "").replace("\n ", "");
    unfolded.lines().any(|l| {
        let l = l.trim_end_matches('\r');
        l.split_once(':').is_some_and(|(name, value)| {
            let name = name.split(';').next().unwrap_or(name);
            name.eq_ignore_ascii_case("UID") && value == uid
        })
    })
}

/// The resources of a `207 Multi-Status` answer that came with calendar data.
pub fn parse_multistatus(xml: &str, base: &Url) -> Result<Vec<Resource>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("bad XML: {e}"))?;
    let root = doc.root_element();
    if !root.has_tag_name((DAV, "multistatus")) {
        return Err(format!(
            "expected a DAV:multistatus, got <{}>",
            root.tag_name().name()
        ));
    }
    let text = |n: roxmltree::Node| -> String {
        n.descendants()
            .filter(|d| d.is_text())
            .filter_map(|d| d.text())
            .collect()
    };
    let ok = |status: Option<roxmltree::Node>| {
        status.is_none_or(|s| text(s).split_whitespace().nth(1) == Some("200"))
    };
    let mut out = Vec::new();
    for response in root
        .children()
        .filter(|n| n.has_tag_name((DAV, "response")))
    {
        let child = |name: &str| response.children().find(|n| n.has_tag_name((DAV, name)));
        let Some(href) = child("href").map(text) else {
            continue;
        };
        if !ok(child("status")) {
            continue;
        }
        let Ok(href) = base.join(href.trim()) else {
            continue;
        };
        let (mut etag, mut ics) = (None, None);
        for propstat in response
            .children()
            .filter(|n| n.has_tag_name((DAV, "propstat")))
        {
            if !ok(propstat
                .children()
                .find(|n| n.has_tag_name((DAV, "status"))))
            {
                continue;
            }
            for prop in propstat
                .children()
                .filter(|n| n.has_tag_name((DAV, "prop")))
            {
                for p in prop.children().filter(|n| n.is_element()) {
                    if p.has_tag_name((DAV, "getetag")) {
                        etag = Some(text(p).trim().to_string()).filter(|t| !t.is_empty());
                    } else if p.has_tag_name((CALDAV, "calendar-data")) {
                        ics = Some(text(p)).filter(|t| !t.trim().is_empty());
                    }
                }
            }
        }
        if let Some(ics) = ics {
            out.push(Resource { href, etag, ics });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Url {
        Url::parse("http://127.0.0.1:5232/alice/calendar/").unwrap()
    }

    #[test]
    fn multistatus_yields_resources_with_data_and_etags() {
        let xml = r#"<?xml version='1.0' encoding='utf-8'?>
<multistatus xmlns="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
  <response>
    <href>/alice/calendar/a%20b.ics</href>
    <propstat>
      <prop><getetag>"e1"</getetag><C:calendar-data>BEGIN:VCALENDAR&#13;
UID:a &amp; b&#13;
END:VCALENDAR&#13;
</C:calendar-data></prop>
      <status>HTTP/1.1 200 OK</status>
    </propstat>
    <propstat><prop><C:other/></prop><status>HTTP/1.1 404 Not Found</status></propstat>
  </response>
  <response>
    <href>http://127.0.0.1:5232/alice/calendar/c.ics</href>
    <propstat><prop><getetag>"e2"</getetag><C:calendar-data><![CDATA[BEGIN:VCALENDAR
END:VCALENDAR
]]></C:calendar-data></prop><status>HTTP/1.1 200 OK</status></propstat>
  </response>
  <response><href>/alice/calendar/gone.ics</href><status>HTTP/1.1 404 Not Found</status></response>
  <response><href>/alice/calendar/nodata.ics</href>
    <propstat><prop><getetag>"e3"</getetag></prop><status>HTTP/1.1 200 OK</status></propstat>
  </response>
</multistatus>"#;
        let r = parse_multistatus(xml, &base()).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0].href.as_str(),
            "http://127.0.0.1:5232/alice/calendar/a%20b.ics"
        );
        assert_eq!(r[0].etag.as_deref(), Some("\"e1\""));
        assert!(r[0].ics.contains("UID:a & b\r\n"), "{:?}", r[0].ics);
        assert_eq!(
            r[1].href.as_str(),
            "http://127.0.0.1:5232/alice/calendar/c.ics"
        );
        assert!(r[1].ics.starts_with("BEGIN:VCALENDAR\nEND"));
    }

    #[test]
    fn prefixed_namespaces_and_bad_documents() {
        let xml = r#"<D:multistatus xmlns:D="DAV:" xmlns:cal="urn:ietf:params:xml:ns:caldav">
<D:response><D:href>x.ics</D:href><D:propstat><D:prop><cal:calendar-data>BEGIN:VCALENDAR</cal:calendar-data></D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>
</D:multistatus>"#;
        let r = parse_multistatus(xml, &base()).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].href.path(), "/alice/calendar/x.ics");
        assert_eq!(r[0].etag, None);
        // Same local names in another namespace are not DAV.
        let foreign = r#"<multistatus xmlns="urn:other"><response/></multistatus>"#;
        assert!(parse_multistatus(foreign, &base()).is_err());
        assert!(parse_multistatus("<html>oops", &base()).is_err());
        let dtd =
            r#"<!DOCTYPE lol [<!ENTITY a "aaaa">]><multistatus xmlns="DAV:">&a;</multistatus>"#;
        assert!(parse_multistatus(dtd, &base()).is_err(), "no DTDs");
    }

    #[test]
    fn uid_checks_are_exact_and_queries_escaped() {
        let ics = "BEGIN:VEVENT\r\nUID:abc@kotaemon\r\nEND:VEVENT\r\n";
        assert!(resource_has_uid(ics, "abc@kotaemon"));
        assert!(!resource_has_uid(ics, "abc"));
        assert!(!resource_has_uid(ics, "ABC@kotaemon"));
        assert!(resource_has_uid("UID:long\r\n  uid\r\n", "long uid"));
        assert_eq!(xml_escape(r#"<a&"b'>"#), "&lt;a&amp;&quot;b&apos;&gt;");
        let q = query_body("<C:time-range/>");
        assert!(roxmltree::Document::parse(&q).is_ok(), "{q}");
    }

    #[test]
    fn statuses_become_plain_words() {
        let t = |s: u16| classify(StatusCode::from_u16(s).unwrap(), "REPORT").to_string();
        assert!(t(401).contains("refused the login (401 Unauthorized)"));
        assert!(t(403).contains("does not allow"));
        assert_eq!(
            t(503),
            "the calendar server failed: 503 Service Unavailable"
        );
        assert_eq!(
            t(400),
            "the calendar server answered 400 Bad Request to REPORT"
        );
    }
}
