//! The pickle subset that `torch.save` writes for a state dict, interpreted as data.
//!
//! A pickle is a program for a small stack machine; Python's unpickler runs it, and its GLOBAL
//! and REDUCE opcodes import and call arbitrary functions. This interpreter knows only the
//! opcodes a state dict needs and builds a tree of [`Value`]s. GLOBAL resolves only the handful
//! of names on [`resolve`]'s allow-list, and REDUCE on one of them records what the call would
//! have built (an empty dict, a tensor's description) without calling anything. Any other opcode
//! or name is an error naming it and its offset.
//!
//! Values live in one arena ([`Pickled::values`]); the stack and the memo hold indices into it,
//! so a memoized value fetched again is shared, never copied (no exponential growth from a few
//! bytes), and a container filled after it was memoized is seen filled, as in Python. Every
//! opcode adds at most one value, so the arena, the stack, the marks and the memo are all bounded
//! by the pickle's length, which the caller bounds.

use std::collections::HashMap;

/// Index of a value in [`Pickled::values`].
pub(super) type Id = usize;

/// The most dimensions a tensor may have (torch allows 64 too).
pub(super) const MAX_DIMS: usize = 64;

/// The longest storage key or device name accepted (torch writes a decimal key and e.g. `cpu`).
const MAX_STORAGE_STRING: usize = 64;

/// The longest module or attribute name a GLOBAL may give.
const MAX_GLOBAL_NAME: usize = 256;

/// Element type of a torch storage class (`torch.FloatStorage` → `F32`, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DType {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    /// Bytes per element.
    pub(super) fn size(self) -> u64 {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// torch's name of the type.
    pub(super) fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }
}

/// A callable that GLOBAL may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Callable {
    /// `collections.OrderedDict`: called with no arguments, an empty dict.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2`: a tensor viewing a storage.
    RebuildTensor,
    /// `torch._utils._rebuild_parameter`: an `nn.Parameter` around a tensor.
    RebuildParameter,
    /// `torch.<Type>Storage`: only ever the type tag of a persistent id, never called.
    Storage(DType),
}

/// A storage named by a persistent id: the archive member `<prefix>/data/<key>` holding `numel`
/// elements of `dtype`. Strings stay in the arena (ids), so that building one allocates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Storage {
    pub dtype: DType,
    /// A [`Value::Str`] of at most 64 bytes.
    pub key: Id,
    pub numel: u64,
}

/// What `_rebuild_tensor_v2` was asked to build: a view of a storage, in elements. The size and
/// stride tuples stay in the arena, checked (as many entries, non-negative ints, at most
/// [`MAX_DIMS`]); [`Pickled::dims`] reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct TensorRef {
    /// The [`Value::Storage`] viewed.
    pub storage: Id,
    pub offset: u64,
    pub size: Id,
    pub stride: Id,
}

/// One value of the tree.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    /// A dict or an `OrderedDict`, in insertion order.
    Dict(Vec<(Id, Id)>),
    Callable(Callable),
    Storage(Storage),
    Tensor(TensorRef),
}

impl Value {
    /// What the value is, for messages ("a str").
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a str",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Callable(_) => "a class or function",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }
}

/// A pickle read to its STOP: the arena and the value it returned.
#[derive(Debug)]
pub(super) struct Pickled {
    pub values: Vec<Value>,
    pub root: Id,
}

impl Pickled {
    /// The string at `id` (empty if it is not one).
    pub(super) fn str(&self, id: Id) -> &str {
        match &self.values[id] {
            Value::Str(s) => s,
            _ => "",
        }
    }

    /// A size or stride tuple checked by REDUCE, as numbers.
    pub(super) fn dims(&self, id: Id) -> Vec<u64> {
        let Value::Tuple(items) = &self.values[id] else { return Vec::new() };
        items.iter().map(|&i| if let Value::Int(n) = self.values[i] { n.max(0) as u64 } else { 0 }).collect()
    }
}

/// Upper bound on the bytes of memory [`load`] uses per byte of pickle: an opcode adds at most
/// one value (40 bytes) and one stack slot (8), each at most doubled by a vector's growth, or one
/// memo entry or one mark.
pub(super) const MEMORY_PER_BYTE: u64 = 128;

/// Names (and escapes) a string from the file for a one-line message: control characters
/// escaped, at most 80 characters.
pub(super) fn quoted(s: &str) -> String {
    let mut out: String = s.chars().take(80).flat_map(char::escape_debug).collect();
    if s.chars().nth(80).is_some() {
        out.push('…');
    }
    format!("`{out}`")
}

/// The first 80 characters of `s`.
fn head(s: &str) -> &str {
    s.char_indices().nth(80).map_or(s, |(i, _)| &s[..i])
}

/// Resolves a GLOBAL against the allow-list.
fn resolve(module: &str, name: &str) -> Option<Callable> {
    let dtype = match (module, name) {
        ("collections", "OrderedDict") => return Some(Callable::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => return Some(Callable::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => return Some(Callable::RebuildParameter),
        ("torch", "FloatStorage") => DType::F32,
        ("torch", "DoubleStorage") => DType::F64,
        ("torch", "HalfStorage") => DType::F16,
        ("torch", "BFloat16Storage") => DType::BF16,
        ("torch", "LongStorage") => DType::I64,
        ("torch", "IntStorage") => DType::I32,
        ("torch", "ShortStorage") => DType::I16,
        ("torch", "CharStorage") => DType::I8,
        ("torch", "ByteStorage") => DType::U8,
        ("torch", "BoolStorage") => DType::Bool,
        _ => return None,
    };
    Some(Callable::Storage(dtype))
}

// The opcodes interpreted (pickle protocols 2 to 5; torch.save uses 2 unless told otherwise).
const MARK: u8 = b'(';
const STOP: u8 = b'.';
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const NONE: u8 = b'N';
const BINPERSID: u8 = b'Q';
const REDUCE: u8 = b'R';
const BINUNICODE: u8 = b'X';
const APPEND: u8 = b'a';
const BUILD: u8 = b'b';
const GLOBAL: u8 = b'c';
const EMPTY_DICT: u8 = b'}';
const APPENDS: u8 = b'e';
const BINGET: u8 = b'h';
const LONG_BINGET: u8 = b'j';
const EMPTY_LIST: u8 = b']';
const BINPUT: u8 = b'q';
const LONG_BINPUT: u8 = b'r';
const SETITEM: u8 = b's';
const TUPLE: u8 = b't';
const EMPTY_TUPLE: u8 = b')';
const SETITEMS: u8 = b'u';
const BINFLOAT: u8 = b'G';
const PROTO: u8 = 0x80;
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const LONG1: u8 = 0x8a;
const SHORT_BINUNICODE: u8 = 0x8c;
const BINUNICODE8: u8 = 0x8d;
const STACK_GLOBAL: u8 = 0x93;
const MEMOIZE: u8 = 0x94;
const FRAME: u8 = 0x95;

/// The name of every opcode of pickle protocols 0 to 5 (Python's `pickletools` names), so that a
/// refusal names the opcode it met.
fn opcode_name(op: u8) -> Option<&'static str> {
    Some(match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return None,
    })
}

/// Runs the pickle in `bytes` to its STOP and returns the value tree.
///
/// # Errors
/// A one-line message with the byte offset: an opcode outside the subset (named), a GLOBAL off
/// the allow-list, a REDUCE, BUILD, BINPERSID or container opcode on values it cannot apply to,
/// a stack or memo underflow, truncation, or bytes after STOP.
pub(super) fn load(bytes: &[u8]) -> Result<Pickled, String> {
    let mut m = Machine {
        bytes,
        pos: 0,
        values: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let root = m.run().map_err(|(at, msg)| format!("byte {at}: {msg}"))?;
    Ok(Pickled { values: m.values, root })
}

/// An error: the offset of the opcode and what is wrong.
type Fault = (usize, String);

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    values: Vec<Value>,
    stack: Vec<Id>,
    /// Stack lengths at each MARK; the last is the fence below which nothing may be popped.
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
}

impl<'a> Machine<'a> {
    fn run(&mut self) -> Result<Id, Fault> {
        loop {
            let at = self.pos;
            let op = self.take(1).map_err(|m| (at, m))?[0];
            self.step(op).map_err(|msg| (at, msg))?;
            if op == STOP {
                break;
            }
        }
        let at = self.pos;
        if self.pos != self.bytes.len() {
            return Err((at, format!("{} bytes follow STOP", self.bytes.len() - self.pos)));
        }
        match (self.stack.as_slice(), self.marks.is_empty()) {
            (&[root], true) => Ok(root),
            _ => Err((
                at,
                format!(
                    "STOP leaves {} values and {} marks, not one value",
                    self.stack.len(),
                    self.marks.len()
                ),
            )),
        }
    }

    /// The next `n` bytes of the pickle.
    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(format!("truncated: the opcode needs {n} more bytes, {left} are left"));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let b = self.take(N as u64)?;
        Ok(b.try_into().expect("take returned N bytes"))
    }

    fn take_str(&mut self, n: u64) -> Result<String, String> {
        let b = self.take(n)?;
        std::str::from_utf8(b).map(str::to_string).map_err(|_| "a string that is not UTF-8".to_string())
    }

    /// A GLOBAL operand: text up to a newline, bounded.
    fn take_line(&mut self) -> Result<String, String> {
        let rest = &self.bytes[self.pos..];
        let Some(len) = rest.iter().take(MAX_GLOBAL_NAME + 1).position(|&b| b == b'\n') else {
            return Err(format!("GLOBAL operand without a newline in its first {MAX_GLOBAL_NAME} bytes"));
        };
        let line = self.take_str(len as u64)?;
        self.pos += 1;
        Ok(line)
    }

    fn push(&mut self, v: Value) {
        self.values.push(v);
        self.stack.push(self.values.len() - 1);
    }

    fn fence(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self, op: &str) -> Result<Id, String> {
        if self.stack.len() <= self.fence() {
            return Err(format!("{op} on an empty stack (or across a MARK)"));
        }
        Ok(self.stack.pop().expect("the stack is above its fence"))
    }

    fn top(&self, op: &str) -> Result<Id, String> {
        match self.stack.last() {
            Some(&id) if self.stack.len() > self.fence() => Ok(id),
            _ => Err(format!("{op} on an empty stack (or across a MARK)")),
        }
    }

    /// The values pushed since the last MARK, which is removed.
    fn pop_mark(&mut self, op: &str) -> Result<Vec<Id>, String> {
        let mark = self.marks.pop().ok_or_else(|| format!("{op} without a MARK"))?;
        Ok(self.stack.split_off(mark))
    }

    fn memo_get(&self, index: u32) -> Result<Id, String> {
        self.memo.get(&index).copied().ok_or_else(|| format!("memo entry {index} was never stored"))
    }

    fn step(&mut self, op: u8) -> Result<(), String> {
        match op {
            PROTO => {
                let [v] = self.take_array()?;
                if v > 5 {
                    return Err(format!("pickle protocol {v}, newer than the 5 this reader knows"));
                }
            }
            // Frames only group opcodes for buffering; their content is read as usual.
            FRAME => {
                let n = u64::from_le_bytes(self.take_array()?);
                if n > (self.bytes.len() - self.pos) as u64 {
                    return Err(format!("FRAME of {n} bytes, longer than the rest of the pickle"));
                }
            }
            STOP => {}
            MARK => self.marks.push(self.stack.len()),
            EMPTY_DICT => self.push(Value::Dict(Vec::new())),
            EMPTY_LIST => self.push(Value::List(Vec::new())),
            EMPTY_TUPLE => self.push(Value::Tuple(Vec::new())),
            TUPLE => {
                let items = self.pop_mark("TUPLE")?;
                self.push(Value::Tuple(items));
            }
            TUPLE1 | TUPLE2 | TUPLE3 => {
                let n = usize::from(op - TUPLE1 + 1);
                let mut items = vec![0; n];
                for slot in items.iter_mut().rev() {
                    *slot = self.pop("TUPLEn")?;
                }
                self.push(Value::Tuple(items));
            }
            NONE => self.push(Value::None),
            NEWTRUE => self.push(Value::Bool(true)),
            NEWFALSE => self.push(Value::Bool(false)),
            BININT => {
                let v = i32::from_le_bytes(self.take_array()?);
                self.push(Value::Int(v.into()));
            }
            BININT1 => {
                let [v] = self.take_array()?;
                self.push(Value::Int(v.into()));
            }
            BININT2 => {
                let v = u16::from_le_bytes(self.take_array()?);
                self.push(Value::Int(v.into()));
            }
            LONG1 => {
                let [n] = self.take_array()?;
                if n > 8 {
                    return Err(format!("LONG1 of {n} bytes, wider than 64 bits"));
                }
                let b = self.take(n.into())?;
                // Little-endian two's complement, sign-extended from its last byte.
                let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) { 0xff } else { 0 };
                let mut full = [fill; 8];
                full[..b.len()].copy_from_slice(b);
                self.push(Value::Int(i64::from_le_bytes(full)));
            }
            BINFLOAT => {
                let v = f64::from_be_bytes(self.take_array()?);
                self.push(Value::Float(v));
            }
            BINUNICODE | SHORT_BINUNICODE | BINUNICODE8 => {
                let n = match op {
                    SHORT_BINUNICODE => u64::from(self.take_array::<1>()?[0]),
                    BINUNICODE => u32::from_le_bytes(self.take_array()?).into(),
                    _ => u64::from_le_bytes(self.take_array()?),
                };
                let s = self.take_str(n)?;
                self.push(Value::Str(s));
            }
            BINPUT | LONG_BINPUT | MEMOIZE => {
                let index = match op {
                    BINPUT => self.take_array::<1>()?[0].into(),
                    LONG_BINPUT => u32::from_le_bytes(self.take_array()?),
                    _ => u32::try_from(self.memo.len()).map_err(|_| "memo overflow".to_string())?,
                };
                let top = self.top("PUT")?;
                self.memo.insert(index, top);
            }
            BINGET | LONG_BINGET => {
                let index = match op {
                    BINGET => self.take_array::<1>()?[0].into(),
                    _ => u32::from_le_bytes(self.take_array()?),
                };
                let id = self.memo_get(index)?;
                self.stack.push(id);
            }
            SETITEM => {
                let v = self.pop("SETITEM")?;
                let k = self.pop("SETITEM")?;
                let dict = self.top("SETITEM")?;
                self.dict_mut(dict, "SETITEM")?.push((k, v));
            }
            SETITEMS => {
                let items = self.pop_mark("SETITEMS")?;
                if items.len() % 2 != 0 {
                    return Err(format!("SETITEMS with an odd number ({}) of keys and values", items.len()));
                }
                let dict = self.top("SETITEMS")?;
                self.dict_mut(dict, "SETITEMS")?.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
            }
            APPEND => {
                let v = self.pop("APPEND")?;
                let list = self.top("APPEND")?;
                self.list_mut(list, "APPEND")?.push(v);
            }
            APPENDS => {
                let items = self.pop_mark("APPENDS")?;
                let list = self.top("APPENDS")?;
                self.list_mut(list, "APPENDS")?.extend(items);
            }
            GLOBAL => {
                let module = self.take_line()?;
                let name = self.take_line()?;
                let callable = allowed_global(&module, &name)?;
                self.push(Value::Callable(callable));
            }
            STACK_GLOBAL => {
                let name = self.pop("STACK_GLOBAL")?;
                let module = self.pop("STACK_GLOBAL")?;
                let (Value::Str(module), Value::Str(name)) = (&self.values[module], &self.values[name])
                else {
                    return Err("STACK_GLOBAL on values that are not two strings".into());
                };
                let callable = allowed_global(module, name)?;
                self.push(Value::Callable(callable));
            }
            REDUCE => {
                let args = self.pop("REDUCE")?;
                let callable = self.pop("REDUCE")?;
                self.reduce(callable, args)?;
            }
            BUILD => {
                // torch sets an OrderedDict's attributes this way (its `_metadata`, the
                // modules' versions); attributes are not items, so the state is ignored.
                self.pop("BUILD")?;
                let obj = self.top("BUILD")?;
                if !matches!(self.values[obj], Value::Dict(_)) {
                    return Err(format!(
                        "BUILD on {}; only a dict's attributes may be set",
                        self.values[obj].kind()
                    ));
                }
            }
            BINPERSID => {
                let pid = self.pop("BINPERSID")?;
                let storage = self.storage(pid)?;
                self.push(Value::Storage(storage));
            }
            _ => {
                let name =
                    opcode_name(op).map_or_else(|| "not a pickle opcode".to_string(), |n| n.to_string());
                return Err(format!(
                    "opcode 0x{op:02x} ({name}) is outside the pickle subset torch.save writes for a state \
                     dict; ddpm never runs code from a pickle, so it cannot read this file"
                ));
            }
        }
        Ok(())
    }

    fn dict_mut(&mut self, id: Id, op: &str) -> Result<&mut Vec<(Id, Id)>, String> {
        match &mut self.values[id] {
            Value::Dict(items) => Ok(items),
            other => Err(format!("{op} on {}, not a dict", other.kind())),
        }
    }

    fn list_mut(&mut self, id: Id, op: &str) -> Result<&mut Vec<Id>, String> {
        match &mut self.values[id] {
            Value::List(items) => Ok(items),
            other => Err(format!("{op} on {}, not a list", other.kind())),
        }
    }

    /// REDUCE: `callable(*args)` for the allow-listed callables, built as data.
    fn reduce(&mut self, callable: Id, args: Id) -> Result<(), String> {
        let Value::Callable(callable) = self.values[callable] else {
            return Err(format!(
                "REDUCE calls {}, not an allowed class or function",
                self.values[callable].kind()
            ));
        };
        let Value::Tuple(args) = &self.values[args] else {
            return Err(format!("REDUCE with {} for arguments, not a tuple", self.values[args].kind()));
        };
        match callable {
            Callable::OrderedDict if args.is_empty() => self.push(Value::Dict(Vec::new())),
            Callable::OrderedDict => return Err("OrderedDict called with arguments".into()),
            Callable::RebuildTensor => {
                let tensor = tensor_from_args(&self.values, args)?;
                self.push(Value::Tensor(tensor));
            }
            Callable::RebuildParameter => {
                // _rebuild_parameter(data, requires_grad, backward_hooks): the tensor itself.
                let &[data, requires_grad, hooks] = args.as_slice() else {
                    return Err(format!("_rebuild_parameter with {} arguments, not 3", args.len()));
                };
                match (&self.values[data], &self.values[requires_grad], &self.values[hooks]) {
                    (Value::Tensor(_), Value::Bool(_), Value::Dict(_)) => self.stack.push(data),
                    _ => return Err("_rebuild_parameter's arguments are not (tensor, bool, dict)".into()),
                }
            }
            Callable::Storage(dtype) => {
                return Err(format!("a {} storage class called; torch.save never does that", dtype.name()))
            }
        }
        Ok(())
    }

    /// BINPERSID: the persistent id `('storage', StorageClass, key, location, numel)`.
    fn storage(&self, pid: Id) -> Result<Storage, String> {
        let bad = || {
            "BINPERSID's id is not ('storage', torch.<Type>Storage, key, location, numel) with short strings \
             and a non-negative numel"
                .to_string()
        };
        let Value::Tuple(fields) = &self.values[pid] else { return Err(bad()) };
        let &[tag, class, key, location, numel] = fields.as_slice() else { return Err(bad()) };
        let short = |id: Id| matches!(&self.values[id], Value::Str(s) if s.len() <= MAX_STORAGE_STRING);
        match (&self.values[tag], &self.values[class], &self.values[numel]) {
            (Value::Str(tag), &Value::Callable(Callable::Storage(dtype)), &Value::Int(n))
                if tag == "storage" && short(key) && short(location) && n >= 0 =>
            {
                Ok(Storage { dtype, key, numel: n as u64 })
            }
            _ => Err(bad()),
        }
    }
}

/// The allow-listed callable a GLOBAL names, or the refusal naming it.
fn allowed_global(module: &str, name: &str) -> Result<Callable, String> {
    resolve(module, name).ok_or_else(|| {
        format!(
            "GLOBAL {} is not one of the names a state dict uses (collections.OrderedDict, \
             torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, torch's storage \
             classes); ddpm reads only torch.save(model.state_dict()) files and never runs code \
             from a pickle",
            quoted(&format!("{}.{}", head(module), head(name)))
        )
    })
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks
/// [, metadata])`, checked and recorded.
fn tensor_from_args(values: &[Value], args: &[Id]) -> Result<TensorRef, String> {
    if !(6..=7).contains(&args.len()) {
        return Err(format!("_rebuild_tensor_v2 with {} arguments, not 6 or 7", args.len()));
    }
    let arg = |i: usize| &values[args[i]];
    let expected = |i: usize, what: &str| {
        format!("_rebuild_tensor_v2's argument {} is {}, not {what}", i + 1, arg(i).kind())
    };
    let Value::Storage(_) = arg(0) else { return Err(expected(0, "a storage")) };
    let Value::Int(offset) = *arg(1) else { return Err(expected(1, "an int")) };
    let offset = u64::try_from(offset).map_err(|_| format!("a negative storage offset {offset}"))?;
    let dims = |i: usize, what: &str| -> Result<usize, String> {
        let Value::Tuple(items) = arg(i) else { return Err(expected(i, "a tuple")) };
        if items.len() > MAX_DIMS {
            return Err(format!("a tensor {what} of {} dimensions, more than {MAX_DIMS}", items.len()));
        }
        match items.iter().find(|&&id| !matches!(values[id], Value::Int(n) if n >= 0)) {
            Some(&id) => {
                Err(format!("a tensor {what} holding {}, not a non-negative int", values[id].kind()))
            }
            None => Ok(items.len()),
        }
    };
    let (size, stride) = (dims(2, "size")?, dims(3, "stride")?);
    if size != stride {
        return Err(format!("a tensor of {size} dimensions with {stride} strides"));
    }
    let Value::Bool(_) = arg(4) else { return Err(expected(4, "a bool (requires_grad)")) };
    let Value::Dict(_) = arg(5) else { return Err(expected(5, "a dict (backward hooks)")) };
    // Metadata, when present, carries flags (such as the conjugate bit) that change the values.
    match args.get(6).map(|&id| &values[id]) {
        None | Some(Value::None) => {}
        Some(Value::Dict(items)) if items.is_empty() => {}
        Some(_) => {
            return Err("a tensor with metadata (e.g. a conjugate or negative bit) ddpm cannot apply".into())
        }
    }
    Ok(TensorRef { storage: args[0], offset, size: args[2], stride: args[3] })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A pickle writer for tests: the opcodes torch.save emits.
    #[derive(Default)]
    pub struct Writer(pub Vec<u8>);

    impl Writer {
        pub fn op(&mut self, op: u8) -> &mut Self {
            self.0.push(op);
            self
        }
        pub fn str(&mut self, s: &str) -> &mut Self {
            self.0.push(BINUNICODE);
            self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
            self.0.extend_from_slice(s.as_bytes());
            self
        }
        pub fn int(&mut self, v: u32) -> &mut Self {
            match u8::try_from(v) {
                Ok(v) => self.0.extend_from_slice(&[BININT1, v]),
                Err(_) => {
                    self.0.push(BININT);
                    self.0.extend_from_slice(&v.to_le_bytes());
                }
            }
            self
        }
        pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.0.push(GLOBAL);
            self.0.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
            self
        }
        /// `_rebuild_tensor_v2(storage(key, class, numel), offset, size, stride, False, OrderedDict())`.
        pub fn tensor(
            &mut self,
            class: &str,
            key: &str,
            numel: u32,
            offset: u32,
            size: &[u32],
            stride: &[u32],
        ) -> &mut Self {
            self.global("torch._utils", "_rebuild_tensor_v2").op(MARK).op(MARK).str("storage");
            self.global("torch", class).str(key).str("cpu").int(numel).op(TUPLE).op(BINPERSID).int(offset);
            for dims in [size, stride] {
                self.op(MARK);
                for &d in dims {
                    self.int(d);
                }
                self.op(TUPLE);
            }
            self.op(NEWFALSE).global("collections", "OrderedDict").op(EMPTY_TUPLE).op(REDUCE);
            self.op(TUPLE).op(REDUCE)
        }
        /// An OrderedDict of `entries` (each pushing a key and a value), then STOP.
        pub fn state_dict(entries: &[&dyn Fn(&mut Writer)]) -> Vec<u8> {
            let mut w = Writer::default();
            w.op(PROTO).op(2).global("collections", "OrderedDict").op(EMPTY_TUPLE).op(REDUCE).op(MARK);
            for e in entries {
                e(&mut w);
            }
            w.op(SETITEMS).op(STOP);
            w.0
        }
    }

    #[test]
    fn a_state_dict_pickle_becomes_a_tree_of_tensor_descriptions() {
        let p = Writer::state_dict(&[&|w| {
            w.str("w").tensor("FloatStorage", "0", 6, 0, &[2, 3], &[3, 1]);
        }]);
        let tree = load(&p).expect("valid");
        let Value::Dict(items) = &tree.values[tree.root] else { panic!("a dict") };
        assert_eq!(items.len(), 1);
        assert_eq!(tree.values[items[0].0], Value::Str("w".into()));
        let Value::Tensor(t) = &tree.values[items[0].1] else { panic!("a tensor") };
        assert_eq!((t.offset, tree.dims(t.size), tree.dims(t.stride)), (0, vec![2, 3], vec![3, 1]));
        let Value::Storage(s) = &tree.values[t.storage] else { panic!("a storage") };
        assert_eq!((s.dtype, tree.str(s.key), s.numel), (DType::F32, "0", 6));
    }

    #[test]
    fn a_forbidden_global_is_refused_naming_it_and_its_offset() {
        let mut w = Writer::default();
        w.op(PROTO).op(2).global("os", "system").str("echo").op(TUPLE1).op(REDUCE).op(STOP);
        let e = load(&w.0).expect_err("os.system");
        assert!(e.contains("byte 2") && e.contains("`os.system`"), "{e}");
    }

    #[test]
    fn opcodes_outside_the_subset_are_refused_by_byte_and_name() {
        for (op, name) in [(0x81u8, "NEWOBJ"), (b'i', "INST"), (b'0', "POP"), (0xff, "not a pickle opcode")] {
            let e = load(&[PROTO, 2, NONE, op, STOP]).expect_err("refused");
            assert!(e.starts_with("byte 3:") && e.contains(&format!("0x{op:02x} ({name})")), "{e}");
        }
    }

    #[test]
    fn memo_references_share_values_and_a_filled_dict_is_seen_filled() {
        // d = {}; memo[0] = d; d["a"] = None; return (d, memo[0]) — both the same filled dict.
        let mut w = Writer::default();
        w.op(PROTO).op(2).op(EMPTY_DICT).op(BINPUT).op(0).str("a").op(NONE).op(SETITEM);
        w.op(BINGET).op(0).op(TUPLE2).op(STOP);
        let tree = load(&w.0).expect("valid");
        let Value::Tuple(items) = &tree.values[tree.root] else { panic!("a tuple") };
        assert_eq!(items[0], items[1]);
        assert!(matches!(&tree.values[items[0]], Value::Dict(d) if d.len() == 1));
    }

    #[test]
    fn malformed_programs_are_errors_not_panics() {
        let cases: [&[u8]; 12] = [
            &[],
            &[PROTO, 2],
            &[PROTO, 9, NONE, STOP],
            &[REDUCE, STOP],
            &[NONE, BINGET, 7, STOP],
            &[MARK, NONE, STOP],
            &[NONE, NONE, STOP],
            &[NONE, STOP, NONE],
            &[BINUNICODE, 0xff, 0xff, 0xff, 0xff, b'a'],
            &[BINUNICODE8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            &[LONG1, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, STOP],
            &[MARK, NONE, MARK, SETITEM, STOP],
        ];
        for bytes in cases {
            assert!(load(bytes).is_err(), "{bytes:?}");
        }
    }

    #[test]
    fn long1_is_little_endian_twos_complement() {
        for (bytes, v) in [(&[][..], 0i64), (&[0xff], -1), (&[0x00, 0x80], -32768), (&[0xff, 0x00], 255)] {
            let mut p = vec![LONG1, bytes.len() as u8];
            p.extend_from_slice(bytes);
            p.push(STOP);
            let tree = load(&p).expect("valid");
            assert_eq!(tree.values[tree.root], Value::Int(v));
        }
    }

    #[test]
    fn quoted_escapes_control_characters_and_truncates() {
        assert_eq!(quoted("a\nb"), "`a\\nb`");
        assert_eq!(quoted(&"x".repeat(100)), format!("`{}…`", "x".repeat(80)));
    }
}
