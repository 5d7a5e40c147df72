//! `KOTAEMON_<SECTION>__<KEY>=value` overrides, applied to the parsed TOML before it is typed,
//! so overrides go through exactly the same validation as the file.

/// Only variables whose first segment names a config section are overrides; others (such as a
/// secret `KOTAEMON_API_KEY` the config refers to) are left alone.
const SECTIONS: &[&str] = &["server", "log", "pool", "upstreams", "stages"];

pub fn apply_overrides(
    table: &mut toml::Table,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    let mut vars: Vec<_> = vars.into_iter().collect();
    vars.sort();
    for (name, raw) in vars {
        let Some(rest) = name.strip_prefix("KOTAEMON_") else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if !SECTIONS.contains(&path[0].as_str()) || path.len() < 2 {
            continue;
        }
        if let Err(e) = set_path(table, &path, parse_scalar(&raw)) {
            problems.push(format!("{name}: {e}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// A value is read as TOML when it parses as one (numbers, booleans, arrays), else as a string.
fn parse_scalar(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (head, tail) = path.split_first().ok_or("empty key")?;
    if tail.is_empty() {
        table.insert(head.clone(), value);
        return Ok(());
    }
    let child = table.entry(head.clone()).or_insert_with(|| {
        if tail[0].parse::<usize>().is_ok() {
            toml::Value::Array(Vec::new())
        } else {
            toml::Value::Table(toml::Table::new())
        }
    });
    set_in_value(child, tail, value)
}

fn set_in_value(node: &mut toml::Value, path: &[String], value: toml::Value) -> Result<(), String> {
    match node {
        toml::Value::Table(t) => set_path(t, path, value),
        toml::Value::Array(items) => {
            let (head, tail) = path.split_first().ok_or("empty key")?;
            let index: usize = head
                .parse()
                .map_err(|_| format!("`{head}` is not a list index"))?;
            if index > items.len() {
                return Err(format!(
                    "list index {index} skips entries (list has {})",
                    items.len()
                ));
            }
            if index == items.len() {
                items.push(toml::Value::Table(toml::Table::new()));
            }
            if tail.is_empty() {
                items[index] = value;
                Ok(())
            } else {
                set_in_value(&mut items[index], tail, value)
            }
        }
        _ => Err(format!(
            "`{}` is a value, not a section",
            path.first().map(String::as_str).unwrap_or("")
        )),
    }
}
