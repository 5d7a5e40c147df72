//! `contacts`: the local directory that resolves "张经理", "Manager Zhang" or "Li Na" to a
//! person and an email on the device. Entries come from a CSV or vCard file and/or inline
//! config. The PII guard uses the same directory to recognize names.

use super::{Effect, Tool, ToolCtx, ToolError, ToolSpec};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContactsConfig {
    pub enabled: bool,
    /// A `.csv` (header: name,email,title,phone,aliases — aliases separated by `;`) or a
    /// `.vcf` vCard file.
    pub path: Option<PathBuf>,
    /// Entries written in the config itself.
    pub entries: Vec<Contact>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Contact {
    /// Full name as written (张伟, Li Na).
    pub name: String,
    pub email: String,
    /// Job title (经理, 总监, Manager): "张经理" is surname + title.
    pub title: String,
    pub phone: String,
    /// Other names people use ("Manager Zhang", "老张", "Wei").
    pub aliases: Vec<String>,
}

/// Honorifics and titles that follow a Chinese surname or precede a Latin one.
const ZH_TITLES: &[&str] = &[
    "经理", "总监", "总", "主任", "部长", "老师", "先生", "女士", "小姐", "博士", "教授", "工",
];
const EN_TITLES: &[&str] = &[
    "mr.",
    "mr",
    "mrs.",
    "mrs",
    "ms.",
    "ms",
    "miss",
    "dr.",
    "dr",
    "prof.",
    "prof",
    "manager",
    "director",
    "president",
];

/// The directory, loaded once at start-up.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    contacts: Vec<Contact>,
}

fn norm(s: &str) -> String {
    s.trim().to_lowercase()
}

impl Directory {
    pub fn new(contacts: Vec<Contact>) -> Self {
        Directory { contacts }
    }

    pub fn load(config: &ContactsConfig) -> Result<Self, String> {
        let mut contacts = config.entries.clone();
        if let Some(path) = &config.path {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("path: cannot read {}: {e}", path.display()))?;
            let parsed = match path.extension().and_then(|e| e.to_str()) {
                Some(e) if e.eq_ignore_ascii_case("csv") => parse_csv(&text),
                Some(e) if e.eq_ignore_ascii_case("vcf") => Ok(parse_vcard(&text)),
                _ => Err("must end in .csv or .vcf".to_string()),
            }
            .map_err(|e| format!("path: {}: {e}", path.display()))?;
            contacts.extend(parsed);
        }
        for (i, c) in contacts.iter().enumerate() {
            if c.name.trim().is_empty() {
                return Err(format!("entries[{i}]: a contact needs a name"));
            }
        }
        Ok(Directory { contacts })
    }

    pub fn contacts(&self) -> &[Contact] {
        &self.contacts
    }

    /// People `query` may mean, best first: exact name or alias, then surname + title
    /// (张经理, Manager Zhang), then a unique part of the name.
    pub fn lookup(&self, query: &str) -> Vec<&Contact> {
        let q = norm(query);
        if q.is_empty() {
            return Vec::new();
        }
        let mut scored: Vec<(u8, &Contact)> = self
            .contacts
            .iter()
            .filter_map(|c| score(c, &q).map(|s| (s, c)))
            .collect();
        scored.sort_by(|a, b| b.0.cmp(&a.0));
        let best = scored.first().map(|s| s.0).unwrap_or(0);
        scored
            .into_iter()
            .filter(|s| s.0 == best)
            .map(|s| s.1)
            .collect()
    }
}

fn score(c: &Contact, q: &str) -> Option<u8> {
    let name = norm(&c.name);
    if name == q || c.aliases.iter().any(|a| norm(a) == q) {
        return Some(3);
    }
    let title = norm(&c.title);
    // 张经理 / 李总: surname (first character) + a title the contact holds.
    for t in ZH_TITLES {
        if let Some(surname) = q.strip_suffix(t) {
            if !surname.is_empty()
                && name.starts_with(surname)
                && (title.contains(t) || matches!(*t, "先生" | "女士" | "小姐" | "老师"))
            {
                return Some(2);
            }
        }
    }
    // Manager Zhang / Mr. Li: a title, then a family name that is a word of the name or of
    // an alias.
    let words: Vec<&str> = q.split_whitespace().collect();
    if words.len() >= 2 && EN_TITLES.contains(&words[0]) {
        let family = words[words.len() - 1];
        let has_word = |s: &str| norm(s).split_whitespace().any(|w| w == family);
        if has_word(&c.name) || c.aliases.iter().any(|a| has_word(a)) {
            return Some(2);
        }
    }
    (q.chars().count() >= 2 && (name.contains(q) || norm(&c.email).starts_with(q))).then_some(1)
}

fn parse_csv(text: &str) -> Result<Vec<Contact>, String> {
    #[derive(Deserialize)]
    struct Row {
        name: String,
        #[serde(default)]
        email: String,
        #[serde(default)]
        title: String,
        #[serde(default)]
        phone: String,
        #[serde(default)]
        aliases: String,
    }
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let mut out = Vec::new();
    for (i, row) in reader.deserialize::<Row>().enumerate() {
        let row = row.map_err(|e| format!("row {}: {e}", i + 2))?;
        out.push(Contact {
            name: row.name,
            email: row.email,
            title: row.title,
            phone: row.phone,
            aliases: row
                .aliases
                .split(';')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect(),
        });
    }
    Ok(out)
}

/// vCard 3/4: FN, EMAIL, TEL, TITLE, NICKNAME (folded lines unfolded; parameters ignored).
fn parse_vcard(text: &str) -> Vec<Contact> {
    let unfolded = text
        .replace("\r\n ", "")
        .replace("\n ", "")
        .replace("\r\n\t", "");
    let mut out = Vec::new();
    let mut current: Option<Contact> = None;
    for line in unfolded.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let prop = key.split(';').next().unwrap_or("").to_ascii_uppercase();
        match (prop.as_str(), current.as_mut()) {
            ("BEGIN", _) if value.eq_ignore_ascii_case("VCARD") => {
                current = Some(Contact::default())
            }
            ("END", Some(_)) => {
                if let Some(c) = current.take().filter(|c| !c.name.is_empty()) {
                    out.push(c);
                }
            }
            ("FN", Some(c)) => c.name = value.trim().to_string(),
            ("EMAIL", Some(c)) if c.email.is_empty() => c.email = value.trim().to_string(),
            ("TEL", Some(c)) if c.phone.is_empty() => c.phone = value.trim().to_string(),
            ("TITLE", Some(c)) => c.title = value.trim().to_string(),
            ("NICKNAME", Some(c)) => c.aliases.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .map(str::to_string),
            ),
            _ => {}
        }
    }
    out
}

struct Lookup {
    spec: ToolSpec,
    directory: Arc<Directory>,
}

#[async_trait]
impl Tool for Lookup {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    async fn call(&self, args: Value, _ctx: &ToolCtx) -> Result<Value, ToolError> {
        let query = args["name"].as_str().unwrap_or("");
        let people: Vec<Value> = self
            .directory
            .lookup(query)
            .into_iter()
            .map(|c| json!({"name": c.name, "email": c.email, "title": c.title}))
            .collect();
        if people.is_empty() {
            return Err(ToolError::Failed(format!(
                "nobody in the directory matches `{query}`"
            )));
        }
        Ok(json!({"matches": people}))
    }
}

pub fn build(config: &ContactsConfig) -> Result<Vec<Arc<dyn Tool>>, Vec<String>> {
    if !config.enabled {
        return Ok(Vec::new());
    }
    let directory = Arc::new(Directory::load(config).map_err(|e| vec![e])?);
    Ok(vec![Arc::new(Lookup {
        spec: ToolSpec {
            name: "contacts_lookup".into(),
            description: "Find a person in the local directory by name, alias, or surname + title (e.g. a surname followed by 经理/总监, or Manager + surname); returns name, email and title. Use it to get attendees' emails.".into(),
            parameters: json!({"type": "object", "properties": {
                "name": {"type": "string", "minLength": 1, "description": "The name as the user said it"}},
                "required": ["name"], "additionalProperties": false}),
            effect: Effect::ReadOnly,
            timeout: Duration::from_secs(2),
        },
        directory,
    })])
}

/// For the guard and tests: the directory of a config, if the file loads.
pub fn directory(config: &ContactsConfig) -> Result<Directory, String> {
    Directory::load(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> Directory {
        let csv = "name,email,title,phone,aliases\n张伟,zhang.wei@example.com,产品经理,13800000001,Manager Zhang;Wei Zhang\n李娜,li.na@example.com,技术总监,,Director Li;Li Na\n王芳,wang.fang@example.com,设计师,,\n";
        let vcf = "BEGIN:VCARD\r\nVERSION:3.0\r\nFN:Zhao Lei\r\nEMAIL;TYPE=work:zhao.lei@example.com\r\nTITLE:Manager\r\nNICKNAME:赵经理,老赵\r\nEND:VCARD\r\n";
        let mut c = parse_csv(csv).unwrap();
        c.extend(parse_vcard(vcf));
        Directory::new(c)
    }

    #[test]
    fn chinese_surname_and_title_resolve_to_one_person() {
        let d = dir();
        let names = |q: &str| {
            d.lookup(q)
                .iter()
                .map(|c| c.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("张经理"), vec!["张伟"]);
        assert_eq!(names("李总监"), vec!["李娜"]);
        assert_eq!(names("李总"), vec!["李娜"]);
        assert_eq!(
            names("赵经理"),
            vec!["Zhao Lei"],
            "alias from vCard NICKNAME"
        );
        assert!(names("王经理").is_empty(), "王芳 is not a manager");
        assert!(names("刘总").is_empty());
    }

    #[test]
    fn english_forms_resolve_too() {
        let d = dir();
        let first = |q: &str| d.lookup(q).first().map(|c| c.email.clone());
        assert_eq!(
            first("Manager Zhang").as_deref(),
            Some("zhang.wei@example.com")
        );
        assert_eq!(first("director li").as_deref(), Some("li.na@example.com"));
        assert_eq!(first("Mr. Zhao").as_deref(), Some("zhao.lei@example.com"));
        assert_eq!(first("Zhao Lei").as_deref(), Some("zhao.lei@example.com"));
        assert!(first("Mr. Smith").is_none());
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let bad = parse_csv("name,email\n\"unterminated,x\n");
        assert!(bad.is_err() || bad.unwrap().len() <= 1);
        let cfg = ContactsConfig {
            enabled: true,
            path: Some("/nonexistent/contacts.csv".into()),
            entries: vec![],
        };
        let e = Directory::load(&cfg).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
    }
}
