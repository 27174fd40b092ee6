//! The zip container of a `.pt` file: which format a file is, where its pickle and storages
//! are, and reading one member bounded by the size the archive declares for it.

use std::borrow::Cow;
use std::io::{Cursor, Read};
use std::path::Path;

use super::Budget;
use crate::error::{Error, Result};

/// The most bytes `data.pkl` may have. A state dict's pickle takes about 200 bytes per tensor,
/// so this allows some 80,000 tensors (the largest guided-diffusion U-Net has under 1,000).
pub const MAX_PICKLE_BYTES: u64 = 16 << 20;

/// How to re-save a file in a format this reader does not take.
const RESAVE: &str = "re-save it with a current torch: torch.save(torch.load(OLD), NEW)";

/// An opened `.pt` archive: `<prefix>/data.pkl`, `<prefix>/data/<key>`, `<prefix>/byteorder`.
pub(super) struct PtArchive<'a> {
    bytes: &'a [u8],
    zip: zip::ZipArchive<Cursor<&'a [u8]>>,
    prefix: String,
    source: &'a Path,
}

impl<'a> PtArchive<'a> {
    /// Opens the archive in `bytes` and checks that it is a little-endian torch.save archive.
    ///
    /// # Errors
    /// [`Error::BadFile`] naming `source` for a legacy (pre-zip) torch file, a non-zip file, a
    /// corrupt archive, two members of one name, no or several `data.pkl`, a TorchScript
    /// archive, or a big-endian one.
    pub(super) fn open(bytes: &'a [u8], source: &'a Path, budget: &mut Budget<'_>) -> Result<Self> {
        refuse_other_formats(bytes, source)?;
        let corrupt = |e: &dyn std::fmt::Display| {
            Error::bad_file(
                source,
                format!("not a valid .pt zip archive, or corrupt/truncated ({})", crate::files::folded(e)),
            )
        };
        let zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| corrupt(&e))?;
        // The zip crate indexes members by name, so a second member of one name would silently
        // replace the first: compare with the count the archive's end record declares.
        if let Some(declared) = crate::files::zip_declared_entries(bytes) {
            if declared != zip.len() {
                return Err(corrupt(&format!(
                    "{declared} members are listed but only {} distinct names: two members share a name",
                    zip.len()
                )));
            }
        }
        // torch names the top folder after the file (older versions) or `archive` (newer).
        let prefixes: Vec<String> = zip
            .file_names()
            .filter_map(|n| n.strip_suffix("/data.pkl"))
            .filter(|p| !p.contains('/'))
            .take(2)
            .map(str::to_string)
            .collect();
        let prefix = match <[String; 1]>::try_from(prefixes) {
            Ok([p]) => p,
            Err(v) if v.is_empty() => {
                return Err(Error::bad_file(
                    source,
                    "a zip archive without a `<name>/data.pkl` member, so not a file torch.save wrote",
                ))
            }
            Err(_) => return Err(Error::bad_file(source, "a zip archive with several `data.pkl` members")),
        };
        let mut archive = PtArchive { bytes, zip, prefix, source };
        if archive.zip.index_for_name(&archive.member("constants.pkl")).is_some() {
            return Err(Error::bad_file(
                source,
                "a TorchScript archive (torch.jit.save), not a state dict; save model.state_dict() with torch.save",
            ));
        }
        // Written by torch ≥ 1.10; older files are little-endian.
        let byteorder = archive.member("byteorder");
        if let Some(size) = archive.size_of(&byteorder) {
            let order = archive.read(&byteorder, Some(size.min(16)), budget)?;
            if *order != *b"little" {
                return Err(Error::bad_file(
                    source,
                    format!(
                        "byteorder {}, not `little`: ddpm reads only little-endian checkpoints; {RESAVE} on a \
                         little-endian machine",
                        super::pickle::quoted(&String::from_utf8_lossy(&order))
                    ),
                ));
            }
        }
        Ok(archive)
    }

    /// The full name of the member `name` under the archive's top folder.
    pub(super) fn member(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    /// The declared size of member `name`, if the archive has it.
    pub(super) fn size_of(&mut self, name: &str) -> Option<u64> {
        self.zip.by_name(name).ok().map(|f| f.size())
    }

    /// Member `name` whole: its declared size must be `expected` (when given) and match the bytes
    /// it holds, whose checksum is verified. A stored member (torch stores every member) is
    /// borrowed from the archive's bytes; a compressed one is inflated into a copy that `budget`
    /// must allow.
    ///
    /// # Errors
    /// [`Error::BadFile`] naming the file and the member if it is missing, of another size,
    /// over the budget, or corrupt.
    pub(super) fn read(
        &mut self,
        name: &str,
        expected: Option<u64>,
        budget: &mut Budget<'_>,
    ) -> Result<Cow<'a, [u8]>> {
        let (source, bytes) = (self.source, self.bytes);
        let bad = |reason: String| {
            Error::bad_file(source, format!("member {}: {reason}", super::pickle::quoted(name)))
        };
        let mut file = self.zip.by_name(name).map_err(|e| match e {
            zip::result::ZipError::FileNotFound => bad("missing from the archive".into()),
            other => bad(format!("corrupt ({})", crate::files::folded(&other))),
        })?;
        let declared = file.size();
        if let Some(expected) = expected {
            if declared != expected {
                return Err(bad(format!("declares {declared} bytes where {expected} are expected")));
            }
        }
        if file.compression() == zip::CompressionMethod::Stored && !file.encrypted() {
            let data = usize::try_from(file.data_start())
                .ok()
                .zip(usize::try_from(declared).ok())
                .filter(|_| file.compressed_size() == declared)
                .and_then(|(start, len)| bytes.get(start..start.checked_add(len)?))
                .ok_or_else(|| bad(format!("declares {declared} bytes that the archive does not hold")))?;
            let mut crc = flate2::Crc::new();
            crc.update(data);
            if crc.sum() != file.crc32() {
                return Err(bad("corrupt: its checksum does not match its bytes".into()));
            }
            return Ok(Cow::Borrowed(data));
        }
        budget.take(&format!("member {} (inflated)", super::pickle::quoted(name)), declared)?;
        let mut data = Vec::with_capacity(declared as usize);
        (&mut file)
            .take(declared.saturating_add(1))
            .read_to_end(&mut data)
            .map_err(|e| bad(format!("corrupt or truncated ({})", crate::files::folded(&e))))?;
        if data.len() as u64 != declared {
            return Err(bad(format!("holds {} bytes but declares {declared}", data.len())));
        }
        Ok(Cow::Owned(data))
    }
}

/// Refuses, with the reason and the fix, what is not a zip archive.
fn refuse_other_formats(bytes: &[u8], source: &Path) -> Result<()> {
    if bytes.starts_with(b"PK") {
        return Ok(());
    }
    // The legacy format is a bare pickle stream (PROTO first, then a magic number); the one
    // before it a tar archive.
    let reason = if bytes.first() == Some(&0x80) {
        format!(
            "a PyTorch file in the legacy format (torch < 1.6, or saved with \
             _use_new_zipfile_serialization=False), which ddpm does not read; {RESAVE}"
        )
    } else if bytes.get(257..262) == Some(b"ustar") {
        format!("a PyTorch file in the tar format of torch < 0.4, which ddpm does not read; {RESAVE}")
    } else {
        "not a PyTorch .pt file (torch.save writes a zip archive, which starts with `PK`)".to_string()
    };
    Err(Error::bad_file(source, reason))
}
