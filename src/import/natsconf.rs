//! The nats.conf format, read the way nats-server reads it (conf/lex.go and conf/parse.go of
//! nats-server 2.x; no maintained Rust crate parses it, so this is written by hand after them):
//!
//! - `key = value`, `key: value` and `key value`; keys bare, `"quoted"` or `'quoted'`;
//! - entries end at a new line, `;` or `,`; `#` and `//` comments;
//! - maps `{ … }`, arrays `[ … ]` (values separated by `,` or new lines), nested freely; the whole
//!   file may be wrapped in `{ … }`;
//! - strings: bare (up to white space, `,`, `;`, `]`, `}`), `'raw'`, `"escaped"` (`\t \n \r \"
//!   \\ \xHH`), and `( … )` blocks ending at a `)` on a line of its own;
//! - `true/false/yes/no/on/off`; integers with size suffixes (`1k` = 1000, `1kb`/`1ki`/`1kib` =
//!   1024, up to `e`/`eb`); floats; `YYYY-MM-DDTHH:MM:SSZ` dates; IP-looking values are strings;
//!   a value that starts with a digit and goes on with letters is a string;
//! - `include path` (relative to the including file), parsed as a file of its own whose keys
//!   land where the include stands;
//! - `$NAME`: the nearest enclosing map's `NAME` defined earlier (inner maps first), else the
//!   environment variable `NAME`, whose text is parsed as a value (`1GB` is a number). A bare
//!   `$2a$…` is a bcrypt hash, not a variable (nats-server's special case).
//!
//! What nats-server accepts and this refuses, with the file and line: nothing it knows of, apart
//! from deliberately odd corners (a lone `/` between entries, which nats-server skips like a
//! space). Errors always say `file:line: what`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Deeper include chains are refused (nats-server would recurse until it crashes on a cycle).
const MAX_INCLUDE_DEPTH: usize = 16;

/// A value with where it was written (the line of its key, for map entries, as nats-server's
/// pedantic mode reports it).
#[derive(Debug, Clone)]
pub struct Node {
    pub value: Value,
    pub file: Arc<Path>,
    pub line: usize,
    /// Set when a `$variable` referred to this entry: nats-server skips such entries where it
    /// would otherwise complain about an unknown field (a variable defined inside `accounts`).
    used: Arc<AtomicBool>,
}

impl Node {
    fn new(value: Value, file: &Arc<Path>, line: usize) -> Node {
        Node {
            value,
            file: file.clone(),
            line,
            used: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether a `$variable` referred to this entry.
    pub fn used_as_variable(&self) -> bool {
        self.used.load(Ordering::Relaxed)
    }

    /// `file:line`, for messages.
    pub fn at(&self) -> String {
        format!("{}:{}", self.file.display(), self.line)
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&Map> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// What kind of value this is, for "expected a map, got a string" messages.
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Str(_) => "a string",
            Value::Int(_) => "a number",
            Value::Float(_) => "a decimal number",
            Value::Bool(_) => "a boolean",
            Value::DateTime(_) => "a date",
            Value::Array(_) => "an array",
            Value::Map(_) => "a map",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// Kept as written (`2026-01-02T03:04:05Z`); nothing we import is a date.
    DateTime(String),
    Array(Vec<Node>),
    Map(Map),
}

/// Entries in the order first written; a key written again replaces the value in place (as
/// nats-server's Go map does, minus the random order).
#[derive(Debug, Clone, Default)]
pub struct Map(Vec<(String, Node)>);

impl Map {
    fn set(&mut self, key: String, node: Node) {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = node,
            None => self.0.push((key, node)),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, n)| n)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Node)> {
        self.0.iter().map(|(k, n)| (k.as_str(), n))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A parse error: always one line, `file:line: what`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}:{line}: {message}", file.display())]
pub struct ParseError {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

/// Reads a nats.conf file (and its includes); `$VARIABLES` fall back to the process environment.
pub fn parse_file(path: &Path) -> Result<Map, ParseError> {
    parse_file_with_env(path, &|name| std::env::var(name).ok())
}

/// As [`parse_file`], with the environment given (tests).
pub fn parse_file_with_env(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Map, ParseError> {
    let text = std::fs::read_to_string(path).map_err(|e| ParseError {
        file: path.to_path_buf(),
        line: 0,
        message: format!("cannot read the file: {e}"),
    })?;
    let mut env_refs = Vec::new();
    Parser::new(&text, path, env, &mut env_refs, 0).document()
}

/// Parses text as if it were the file `path` (includes are relative to its directory).
pub fn parse_str(
    text: &str,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Map, ParseError> {
    let mut env_refs = Vec::new();
    Parser::new(text, path, env, &mut env_refs, 0).document()
}

struct Parser<'a> {
    chars: Vec<char>,
    pos: usize,
    line: usize,
    file: Arc<Path>,
    /// The maps being built, outermost first: where `$NAME` is looked up.
    scopes: Vec<Map>,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// Environment variables being expanded (a cycle is an error, as in nats-server).
    env_refs: &'a mut Vec<String>,
    depth: usize,
}

type Res<T> = Result<T, ParseError>;

fn is_ws(c: char) -> bool {
    c == ' ' || c == '\t'
}

fn is_nl(c: char) -> bool {
    c == '\n' || c == '\r'
}

/// Where a bare string or number ends.
fn ends_bare(c: Option<char>) -> bool {
    match c {
        None => true,
        Some(c) => is_nl(c) || is_ws(c) || matches!(c, ';' | ',' | ']' | '}'),
    }
}

/// Where a number ends (nats-server's lexer: not at `]`, which makes `[1,2]` end in a string).
fn ends_number(c: Option<char>) -> bool {
    match c {
        None => true,
        Some(c) => is_nl(c) || is_ws(c) || matches!(c, ';' | ',' | '}'),
    }
}

fn show(c: Option<char>) -> String {
    match c {
        None => "the end of the file".into(),
        Some('\n') | Some('\r') => "a new line".into(),
        Some(c) => format!("'{c}'"),
    }
}

impl<'a> Parser<'a> {
    fn new(
        text: &str,
        path: &Path,
        env: &'a dyn Fn(&str) -> Option<String>,
        env_refs: &'a mut Vec<String>,
        depth: usize,
    ) -> Self {
        Parser {
            chars: text.chars().collect(),
            pos: 0,
            line: 1,
            file: Arc::from(path),
            scopes: Vec::new(),
            env,
            env_refs,
            depth,
        }
    }

    fn err<T>(&self, message: impl Into<String>) -> Res<T> {
        self.err_at(self.line, message)
    }

    fn err_at<T>(&self, line: usize, message: impl Into<String>) -> Res<T> {
        Err(ParseError {
            file: self.file.to_path_buf(),
            line,
            message: message.into(),
        })
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek2(&self) -> Option<char> {
        self.chars.get(self.pos + 1).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        if c == '\n' {
            self.line += 1;
        }
        Some(c)
    }

    fn at_comment(&self) -> bool {
        self.peek() == Some('#') || (self.peek() == Some('/') && self.peek2() == Some('/'))
    }

    /// Up to (not including) the end of the line.
    fn skip_comment(&mut self) {
        while let Some(c) = self.peek() {
            if is_nl(c) {
                break;
            }
            self.bump();
        }
    }

    /// White space, new lines and comments.
    fn skip_all(&mut self) {
        loop {
            match self.peek() {
                Some(c) if c.is_whitespace() => {
                    self.bump();
                }
                _ if self.at_comment() => self.skip_comment(),
                _ => return,
            }
        }
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(is_ws) {
            self.bump();
        }
    }

    fn document(mut self) -> Res<Map> {
        self.scopes.push(Map::default());
        self.skip_all();
        // JSON-like files: the whole document in braces.
        let close = if self.peek() == Some('{') {
            self.bump();
            Some('}')
        } else {
            None
        };
        self.entries(close, true)?;
        self.skip_all();
        if self.peek().is_some() {
            return self.err(format!("unexpected {} after the end", show(self.peek())));
        }
        Ok(self.scopes.pop().unwrap_or_default())
    }

    /// Key/value entries into the innermost scope, up to `close` (or the end of the file).
    fn entries(&mut self, close: Option<char>, top: bool) -> Res<()> {
        loop {
            self.skip_all();
            match self.peek() {
                None => {
                    return match close {
                        Some(c) => self.err(format!("the file ends before the closing '{c}'")),
                        None => Ok(()),
                    };
                }
                Some(c) if Some(c) == close => {
                    self.bump();
                    return Ok(());
                }
                Some('=') | Some(':') => {
                    return self.err(format!("unexpected key separator {}", show(self.peek())))
                }
                Some(']') if !top => return self.err("unexpected ']' where a key was expected"),
                _ => {}
            }
            let key_line = self.line;
            let (key, bare) = self.key()?;
            if bare && key.eq_ignore_ascii_case("include") && self.peek().is_some_and(is_ws) {
                self.include(key_line)?;
            } else {
                // After the key: any white space (new lines too), then an optional separator.
                self.skip_all_space();
                let separated = matches!(self.peek(), Some('=') | Some(':'));
                if separated {
                    self.bump();
                }
                if top && separated {
                    self.skip_ws();
                } else {
                    self.skip_all_space();
                }
                match self.peek() {
                    None => return self.err_at(key_line, format!("\"{key}\" has no value")),
                    Some(c) if is_nl(c) => {
                        return self
                            .err(format!("expected a value for \"{key}\", found a new line"))
                    }
                    Some(c) if !top && (c == '}' || c == ',') => {
                        return self.err(format!("expected a value for \"{key}\", found '{c}'"))
                    }
                    _ => {}
                }
                let mut node = self.value()?;
                node.line = key_line;
                self.scopes
                    .last_mut()
                    .expect("a scope is open")
                    .set(key.clone(), node);
            }
            // The end of the entry.
            self.skip_ws();
            if self.at_comment() {
                self.skip_comment();
            }
            match self.peek() {
                None => {}
                Some(c) if is_nl(c) || c == ';' || c == ',' => {
                    self.bump();
                }
                Some(c) if Some(c) == close => {}
                Some('}') if top => {
                    // nats-server ends a top-level value at a '}' too.
                    self.bump();
                }
                other => {
                    return self.err(format!(
                    "expected the value of \"{key}\" to end with a new line, ',' or ';', found {}",
                    show(other)
                ))
                }
            }
        }
    }

    fn skip_all_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
    }

    /// A key: quoted (no escapes) or bare (up to white space or a separator). Returns whether
    /// it was bare (only a bare `include` is the keyword).
    fn key(&mut self) -> Res<(String, bool)> {
        match self.peek() {
            Some(q @ ('"' | '\'')) => {
                self.bump();
                let mut key = String::new();
                loop {
                    match self.bump() {
                        None => return self.err("the file ends inside a quoted key"),
                        Some(c) if c == q => return Ok((key, false)),
                        Some(c) => key.push(c),
                    }
                }
            }
            _ => {
                let mut key = String::new();
                while let Some(c) = self.peek() {
                    if c.is_whitespace() || c == '=' || c == ':' {
                        break;
                    }
                    key.push(c);
                    self.bump();
                }
                Ok((key, true))
            }
        }
    }

    fn include(&mut self, line: usize) -> Res<()> {
        self.skip_ws();
        let path = match self.peek() {
            Some(q @ ('"' | '\'')) => {
                self.bump();
                let mut s = String::new();
                loop {
                    match self.bump() {
                        None => return self.err("the file ends inside a quoted include path"),
                        Some(c) if c == q => break s,
                        Some(c) => s.push(c),
                    }
                }
            }
            Some(c) if matches!(c, '[' | '{' | '(' | '-' | '\\') || c.is_ascii_digit() => {
                return self.err(format!("expected an include path, found '{c}'"))
            }
            Some(c) if is_nl(c) => return self.err("expected an include path, found a new line"),
            _ => {
                let mut s = String::new();
                while let Some(c) = self.peek() {
                    if is_nl(c) || is_ws(c) || c == ';' || c == '}' {
                        break;
                    }
                    self.bump();
                    if c == '\'' {
                        break;
                    }
                    s.push(c);
                }
                s
            }
        };
        if self.depth >= MAX_INCLUDE_DEPTH {
            return self.err_at(
                line,
                format!("include \"{path}\": includes nested more than {MAX_INCLUDE_DEPTH} deep (an include cycle?)"),
            );
        }
        let dir = self.file.parent().unwrap_or(Path::new("."));
        let full = dir.join(&path);
        let text = match std::fs::read_to_string(&full) {
            Ok(t) => t,
            Err(e) => {
                return self.err_at(
                    line,
                    format!("cannot read include \"{path}\" ({}): {e}", full.display()),
                )
            }
        };
        let map = Parser::new(&text, &full, self.env, self.env_refs, self.depth + 1).document()?;
        let scope = self.scopes.last_mut().expect("a scope is open");
        for (k, v) in map.0 {
            scope.set(k, v);
        }
        Ok(())
    }

    fn value(&mut self) -> Res<Node> {
        self.skip_ws();
        let line = self.line;
        let file = self.file.clone();
        let node = |v| Node::new(v, &file, line);
        match self.peek() {
            Some('[') => {
                self.bump();
                self.array(line)
            }
            Some('{') => {
                self.bump();
                self.scopes.push(Map::default());
                let done = self.entries(Some('}'), false);
                let map = self.scopes.pop().unwrap_or_default();
                done?;
                Ok(node(Value::Map(map)))
            }
            Some('\'') => {
                self.bump();
                let mut s = String::new();
                loop {
                    match self.bump() {
                        None => return self.err_at(line, "the file ends inside a '…' string"),
                        Some('\'') => return Ok(node(Value::Str(s))),
                        Some(c) => s.push(c),
                    }
                }
            }
            Some('"') => {
                self.bump();
                let mut s = String::new();
                loop {
                    match self.bump() {
                        None => return self.err_at(line, "the file ends inside a \"…\" string"),
                        Some('"') => return Ok(node(Value::Str(s))),
                        Some('\\') => s.push(self.escape()?),
                        Some(c) => s.push(c),
                    }
                }
            }
            Some('(') => {
                self.bump();
                self.block(line).map(|s| node(Value::Str(s)))
            }
            Some('-') => {
                self.bump();
                if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    return self.err(format!(
                        "expected a digit after '-', found {}",
                        show(self.peek())
                    ));
                }
                self.number(self.pos - 1, line)
            }
            Some(c) if c.is_ascii_digit() => self.number(self.pos, line),
            Some('.') => self.err("numbers must start with a digit, not '.'"),
            Some(c) if is_nl(c) => self.err("expected a value, found a new line"),
            _ => self.bare(self.pos, line),
        }
    }

    /// After a `\`: one escaped character (nats-server's set).
    fn escape(&mut self) -> Res<char> {
        match self.bump() {
            Some('t') => Ok('\t'),
            Some('n') => Ok('\n'),
            Some('r') => Ok('\r'),
            Some('"') => Ok('"'),
            Some('\\') => Ok('\\'),
            Some('x') => {
                let hex: String = [self.bump(), self.bump()].iter().flatten().collect();
                match u8::from_str_radix(&hex, 16) {
                    Ok(b) if hex.len() == 2 => Ok(char::from(b)),
                    _ => self.err("expected two hexadecimal digits after '\\x'"),
                }
            }
            other => self.err(format!(
                "invalid escape {}: only \\xXX, \\t, \\n, \\r, \\\" and \\\\ are allowed",
                show(other)
            )),
        }
    }

    fn array(&mut self, line: usize) -> Res<Node> {
        let mut items = Vec::new();
        loop {
            self.skip_all();
            match self.peek() {
                None => {
                    return self.err_at(line, "the file ends inside an array ('[' without ']')")
                }
                Some(']') => {
                    self.bump();
                    return Ok(Node::new(Value::Array(items), &self.file, line));
                }
                Some(',') => return self.err("unexpected ',' in an array"),
                _ => {}
            }
            items.push(self.value()?);
            self.skip_ws();
            if self.at_comment() {
                self.skip_comment();
            }
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some(c) if is_nl(c) => {
                    self.bump();
                }
                Some(']') => {}
                other => {
                    return self.err(format!(
                        "expected ',' or ']' after an array value, found {}",
                        show(other)
                    ))
                }
            }
        }
    }

    /// `( … )`: everything up to a line holding only `)`.
    fn block(&mut self, line: usize) -> Res<String> {
        let start = self.pos;
        loop {
            match self.bump() {
                None => return self.err_at(line, "the file ends inside a ( … ) block"),
                Some('\n') if self.peek() == Some(')') => {
                    let after = self.peek2();
                    if after.is_none() || after == Some('\n') {
                        let text: String = self.chars[start..self.pos - 1].iter().collect();
                        self.bump();
                        return Ok(text);
                    }
                }
                Some(_) => {}
            }
        }
    }

    /// A bare string from `start` (characters before `pos` already belong to it).
    fn bare(&mut self, start: usize, line: usize) -> Res<Node> {
        let mut text = String::new();
        let mut had_escape = false;
        let mut seg = start;
        loop {
            let c = self.peek();
            if ends_bare(c) {
                break;
            }
            if c == Some('\\') {
                text.extend(&self.chars[seg..self.pos]);
                self.bump();
                text.push(self.escape()?);
                had_escape = true;
                seg = self.pos;
                continue;
            }
            self.bump();
            if c == Some('\'') {
                // nats-server ends a bare string at a quote and drops the quote.
                text.extend(&self.chars[seg..self.pos - 1]);
                return Ok(Node::new(Value::Str(text), &self.file, line));
            }
        }
        text.extend(&self.chars[seg..self.pos]);
        if had_escape {
            return Ok(Node::new(Value::Str(text), &self.file, line));
        }
        let value = match text.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" => Value::Bool(true),
            "false" | "no" | "off" => Value::Bool(false),
            _ if text.starts_with('$') && text.len() > 1 => {
                return self.variable(&text[1..], line);
            }
            _ => Value::Str(text),
        };
        Ok(Node::new(value, &self.file, line))
    }

    /// A number, a date, an IP-like string or a string that starts with digits.
    fn number(&mut self, start: usize, line: usize) -> Res<Node> {
        let negative = self.chars[start] == '-';
        loop {
            let c = self.peek();
            match c {
                Some(d) if d.is_ascii_digit() => {
                    self.bump();
                }
                Some('-') if !negative => {
                    if self.pos - start != 4 {
                        return self.err("dates must be in full Zulu form, YYYY-MM-DDTHH:MM:SSZ");
                    }
                    self.bump();
                    return self.date(start, line);
                }
                Some('.') => {
                    self.bump();
                    if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
                        return self.err(format!(
                            "expected a digit after '.', found {}",
                            show(self.peek())
                        ));
                    }
                    while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                        self.bump();
                    }
                    if self.peek() == Some('.') {
                        // An IP address (and maybe a port): a string.
                        while self
                            .peek()
                            .is_some_and(|c| c.is_ascii_digit() || matches!(c, '.' | ':' | '-'))
                        {
                            self.bump();
                        }
                        let s: String = self.chars[start..self.pos].iter().collect();
                        return Ok(Node::new(Value::Str(s), &self.file, line));
                    }
                    let s: String = self.chars[start..self.pos].iter().collect();
                    return match s.parse::<f64>() {
                        Ok(f) if f.is_finite() => Ok(Node::new(Value::Float(f), &self.file, line)),
                        _ => self.err("a number nats-server cannot read"),
                    };
                }
                Some(s) if "kKmMgGtTpPeE".contains(s) => {
                    let digits_end = self.pos;
                    self.bump();
                    while self.peek().is_some_and(|c| "bBiI".contains(c)) {
                        self.bump();
                    }
                    if ends_number(self.peek()) || self.peek().is_some_and(|c| c.is_ascii_digit()) {
                        let suffix: String = self.chars[digits_end..self.pos].iter().collect();
                        return self.integer(start, digits_end, &suffix, line);
                    }
                    if negative {
                        return self.err("a negative number followed by letters");
                    }
                    return self.bare(start, line);
                }
                _ if ends_number(c) => return self.integer(start, self.pos, "", line),
                _ => {
                    if negative {
                        return self.err(format!(
                            "expected a digit in a negative number, found {}",
                            show(c)
                        ));
                    }
                    return self.bare(start, line);
                }
            }
        }
    }

    fn integer(&self, start: usize, digits_end: usize, suffix: &str, line: usize) -> Res<Node> {
        let digits: String = self.chars[start..digits_end].iter().collect();
        let Ok(n) = digits.parse::<i64>() else {
            return self.err_at(
                line,
                "an integer out of range (values are never quoted: this one may be a secret)",
            );
        };
        let mult: i64 = match suffix.to_ascii_lowercase().as_str() {
            "" => 1,
            "k" => 1000,
            "kb" | "ki" | "kib" => 1 << 10,
            "m" => 1000i64.pow(2),
            "mb" | "mi" | "mib" => 1 << 20,
            "g" => 1000i64.pow(3),
            "gb" | "gi" | "gib" => 1 << 30,
            "t" => 1000i64.pow(4),
            "tb" | "ti" | "tib" => 1 << 40,
            "p" => 1000i64.pow(5),
            "pb" | "pi" | "pib" => 1 << 50,
            "e" => 1000i64.pow(6),
            "eb" | "ei" | "eib" => 1 << 60,
            other => return self.err_at(line, format!("unknown size suffix \"{other}\"")),
        };
        match n.checked_mul(mult) {
            Some(v) => Ok(Node::new(Value::Int(v), &self.file, line)),
            None => self.err_at(
                line,
                "an integer out of range (values are never quoted: this one may be a secret)",
            ),
        }
    }

    /// After `YYYY-`.
    fn date(&mut self, start: usize, line: usize) -> Res<Node> {
        for f in "00-00T00:00:00Z".chars() {
            let c = self.bump();
            let ok = match f {
                '0' => c.is_some_and(|c| c.is_ascii_digit()),
                f => c == Some(f),
            };
            if !ok {
                return self.err(format!(
                    "dates must be in full Zulu form, YYYY-MM-DDTHH:MM:SSZ; found {}",
                    show(c)
                ));
            }
        }
        let s: String = self.chars[start..self.pos].iter().collect();
        Ok(Node::new(Value::DateTime(s), &self.file, line))
    }

    /// `$name`, resolved as nats-server does.
    fn variable(&mut self, name: &str, line: usize) -> Res<Node> {
        // A bare bcrypt hash, `$2a$11$…`, is not a reference.
        if name.starts_with("2a$") {
            return Ok(Node::new(Value::Str(format!("${name}")), &self.file, line));
        }
        for scope in self.scopes.iter().rev() {
            if let Some(found) = scope.get(name) {
                found.used.store(true, Ordering::Relaxed);
                let mut node = found.clone();
                node.file = self.file.clone();
                node.line = line;
                return Ok(node);
            }
        }
        if self.env_refs.iter().any(|r| r == name) {
            return self.err_at(line, format!("variable reference cycle for ${name}"));
        }
        let Some(text) = (self.env)(name) else {
            return self.err_at(
                line,
                format!("variable ${name} is neither defined above nor set in the environment"),
            );
        };
        // nats-server parses the variable's text as the value of a key.
        self.env_refs.push(name.to_owned());
        let file = self.file.to_path_buf();
        let parsed = Parser::new(
            &format!("pk={text}"),
            &file,
            self.env,
            self.env_refs,
            self.depth,
        )
        .document();
        self.env_refs.pop();
        let parsed = parsed.map_err(|e| ParseError {
            file: file.clone(),
            line,
            message: format!("environment variable ${name}: {}", e.message),
        })?;
        match parsed.get("pk") {
            Some(node) => {
                let mut node = node.clone();
                node.line = line;
                Ok(node)
            }
            None => self.err_at(line, format!("environment variable ${name} holds no value")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Map {
        parse_env(text, &[])
    }

    fn parse_env(text: &str, vars: &[(&str, &str)]) -> Map {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = move |n: &str| vars.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        parse_str(text, Path::new("/etc/nats/nats.conf"), &env)
            .unwrap_or_else(|e| panic!("parse failed: {e}"))
    }

    fn fail(text: &str) -> String {
        parse_str(text, Path::new("/etc/nats/nats.conf"), &|_| None)
            .expect_err("should fail")
            .to_string()
    }

    fn s<'a>(m: &'a Map, k: &str) -> &'a str {
        m.get(k)
            .and_then(Node::as_str)
            .unwrap_or_else(|| panic!("{k} is not a string"))
    }

    fn int(m: &Map, k: &str) -> i64 {
        match m.get(k).map(|n| &n.value) {
            Some(Value::Int(i)) => *i,
            other => panic!("{k}: {other:?}"),
        }
    }

    #[test]
    fn separators_equal_colon_and_space() {
        let m = parse("a = 1\nb: 2\nc 3\nd=4; e:5, f 6");
        for (k, v) in [("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5), ("f", 6)] {
            assert_eq!(int(&m, k), v, "{k}");
        }
    }

    #[test]
    fn comments_hash_and_slashes() {
        let m = parse("# top\na = 1 # after\n// line\nb = 2 // after\nc { x = 1 # in map\n // also\n y = [1 # in array\n 2] }");
        assert_eq!(int(&m, "a"), 1);
        assert_eq!(int(&m, "b"), 2);
        let c = m.get("c").unwrap().as_map().unwrap();
        assert_eq!(int(c, "x"), 1);
        let Value::Array(y) = &c.get("y").unwrap().value else {
            panic!()
        };
        assert_eq!(y.len(), 2);
    }

    #[test]
    fn strings_bare_single_and_double_quoted() {
        let m = parse(
            "a = hello\nb = 'raw \\n kept'\nc = \"tab\\there \\\"q\\\" \\x41\"\nd = a.b.>\ne = 127.0.0.1:4222\nf = 1foo",
        );
        assert_eq!(s(&m, "a"), "hello");
        assert_eq!(s(&m, "b"), "raw \\n kept");
        assert_eq!(s(&m, "c"), "tab\there \"q\" A");
        assert_eq!(s(&m, "d"), "a.b.>");
        assert_eq!(s(&m, "e"), "127.0.0.1:4222");
        assert_eq!(s(&m, "f"), "1foo");
    }

    #[test]
    fn quoted_keys_and_booleans() {
        let m = parse("\"my key\" = yes\n'other' : off\nt = TRUE");
        assert!(matches!(m.get("my key").unwrap().value, Value::Bool(true)));
        assert!(matches!(m.get("other").unwrap().value, Value::Bool(false)));
        assert!(matches!(m.get("t").unwrap().value, Value::Bool(true)));
    }

    #[test]
    fn numbers_with_size_suffixes() {
        let m = parse(
            "a = 1K\nb = 1KB\nc = 512MB\nd = 1GB\ne = 2g\nf = 1kib\ng = -1\nh = 1.5\ni = 3ti",
        );
        assert_eq!(int(&m, "a"), 1000);
        assert_eq!(int(&m, "b"), 1024);
        assert_eq!(int(&m, "c"), 512 << 20);
        assert_eq!(int(&m, "d"), 1 << 30);
        assert_eq!(int(&m, "e"), 2_000_000_000);
        assert_eq!(int(&m, "f"), 1024);
        assert_eq!(int(&m, "g"), -1);
        assert!(matches!(m.get("h").unwrap().value, Value::Float(f) if f == 1.5));
        assert_eq!(int(&m, "i"), 3 << 40);
    }

    #[test]
    fn maps_and_arrays_with_commas_and_new_lines() {
        let m = parse(
            "accounts {\n  A: { users: [ {user: a, password: p}, {user: b\n password: q} ] }\n  B { users = [\n {user: c, password: r}\n {user: d, password: s},\n ] }\n}",
        );
        let acc = m.get("accounts").unwrap().as_map().unwrap();
        let a = acc.get("A").unwrap().as_map().unwrap();
        let Value::Array(users) = &a.get("users").unwrap().value else {
            panic!()
        };
        assert_eq!(users.len(), 2);
        assert_eq!(s(users[1].as_map().unwrap(), "password"), "q");
        let b = acc.get("B").unwrap().as_map().unwrap();
        let Value::Array(users) = &b.get("users").unwrap().value else {
            panic!()
        };
        assert_eq!(users.len(), 2);
        assert_eq!(users[1].line, 6);
    }

    #[test]
    fn json_like_documents() {
        let m = parse("{\n \"port\": 4222,\n \"authorization\": {\"token\": \"t\"}\n}\n");
        assert_eq!(int(&m, "port"), 4222);
    }

    #[test]
    fn variables_from_the_file_nearest_scope_first_then_the_environment() {
        let m = parse_env(
            "PW = outer\nA { PW = inner, x = $PW }\ny = $PW\nz = $FROM_ENV\nsize = $SIZE",
            &[("FROM_ENV", "env-value"), ("SIZE", "1GB")],
        );
        assert_eq!(s(m.get("A").unwrap().as_map().unwrap(), "x"), "inner");
        assert_eq!(s(&m, "y"), "outer");
        assert_eq!(s(&m, "z"), "env-value");
        assert_eq!(int(&m, "size"), 1 << 30);
        assert!(m.get("PW").unwrap().used_as_variable());
    }

    #[test]
    fn a_bare_bcrypt_hash_is_not_a_variable() {
        let m = parse("p = $2a$11$PWIFAL8RsWyGI3jVZtO9Nu8.6jOxzxfZo7c/W0eLk017hjgUKWrhy");
        assert_eq!(
            s(&m, "p"),
            "$2a$11$PWIFAL8RsWyGI3jVZtO9Nu8.6jOxzxfZo7c/W0eLk017hjgUKWrhy"
        );
    }

    #[test]
    fn includes_are_relative_to_the_including_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sub")).unwrap();
        std::fs::write(
            dir.path().join("sub/b.conf"),
            "B { users = [{user: b, password: x}] }\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("sub/accounts.conf"),
            "accounts {\n include b.conf\n A {}\n}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("main.conf"),
            "port 4222\ninclude 'sub/accounts.conf'\n",
        )
        .unwrap();
        let m = parse_file_with_env(&dir.path().join("main.conf"), &|_| None).unwrap();
        let acc = m.get("accounts").unwrap().as_map().unwrap();
        assert!(acc.get("A").is_some());
        let b = acc.get("B").unwrap();
        assert!(b.file.ends_with("sub/b.conf"), "{}", b.at());
        assert_eq!(b.line, 1);
    }

    #[test]
    fn include_cycles_and_missing_files_are_refused_with_the_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.conf"), "x = 1\ninclude a.conf\n").unwrap();
        let e = parse_file_with_env(&dir.path().join("a.conf"), &|_| None).unwrap_err();
        assert!(e.to_string().contains("a.conf:2: include"), "{e}");
        std::fs::write(dir.path().join("b.conf"), "\n\ninclude nope.conf\n").unwrap();
        let e = parse_file_with_env(&dir.path().join("b.conf"), &|_| None).unwrap_err();
        assert!(
            e.to_string()
                .contains("b.conf:3: cannot read include \"nope.conf\""),
            "{e}"
        );
    }

    #[test]
    fn blocks_and_dates() {
        let m = parse("a = (\nline one\nline two\n)\nb = 2026-01-02T03:04:05Z\n");
        assert_eq!(s(&m, "a"), "\nline one\nline two");
        assert!(matches!(m.get("b").unwrap().value, Value::DateTime(_)));
    }

    #[test]
    fn errors_name_the_file_and_line() {
        assert_eq!(
            fail("a = 1\nb = \"open\n"),
            "/etc/nats/nats.conf:2: the file ends inside a \"…\" string"
        );
        assert!(fail("a {\n b = 1\n")
            .starts_with("/etc/nats/nats.conf:3: the file ends before the closing '}'"));
        assert!(fail("a = 1\n\nx = $NOPE\n").starts_with("/etc/nats/nats.conf:3: variable $NOPE"));
        assert!(fail("a = [1,,2]").contains(":1: unexpected ','"));
        assert!(fail("a = one two\n")
            .starts_with("/etc/nats/nats.conf:1: expected the value of \"a\" to end"));
        assert!(fail("a = 1\nb = \"\\q\"\n").starts_with("/etc/nats/nats.conf:2: invalid escape"));
        assert!(fail("a = 99999999999999999999\n").contains("out of range"));
    }

    #[test]
    fn environment_cycles_are_refused() {
        let env = |n: &str| match n {
            "A" => Some("$B".to_string()),
            "B" => Some("$A".to_string()),
            _ => None,
        };
        let e = parse_str("x = $A\n", Path::new("n.conf"), &env).unwrap_err();
        assert!(e.to_string().contains("cycle"), "{e}");
    }
}
