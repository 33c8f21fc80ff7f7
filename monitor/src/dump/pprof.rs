//! A dump as a goroutine profile in pprof's profile.proto (gzipped), as Go's own
//! `/debug/pprof/goroutine` serves it: one sample per distinct stack, its value the number of
//! tasks, so `go tool pprof -top`, `-traces` and `-http` read it. State, wait reason and
//! verdict are labels. Encoded with a kept crate's profile.proto types.

use std::{collections::HashMap, io::Write, sync::Arc};

use libdd_profiling_protobuf::prost_impls::{
    Function, Label, Line, Location, Mapping, Message as _, Profile, Sample, ValueType,
};

use super::{Dump, Frame, Labels, frames_of, physical};

#[derive(Default)]
struct Builder {
    profile: Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(Arc<str>, Arc<str>), u64>,
    /// By pc (the same call holds the same inlined calls), or for a frame with none (an entry
    /// standing for its stack) by function.
    locations: HashMap<(u64, Arc<str>), u64>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(i) = self.strings.get(s) {
            return *i;
        }
        let i = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), i);
        i
    }

    fn function(&mut self, f: &Frame) -> u64 {
        let key = (Arc::clone(&f.function), Arc::clone(&f.file));
        if let Some(id) = self.functions.get(&key) {
            return *id;
        }
        let id = self.profile.functions.len() as u64 + 1;
        let name = self.string(&f.function);
        let filename = self.string(&f.file);
        self.profile.functions.push(Function {
            id,
            name,
            system_name: name,
            filename,
        });
        self.functions.insert(key, id);
        id
    }

    /// The location of one physical frame (its inlined calls, then itself), innermost first
    /// as profile.proto orders its lines.
    fn location(&mut self, frames: &[Frame]) -> u64 {
        let Some(first) = frames.first() else {
            return 0;
        };
        let key = (
            first.pc,
            if first.pc == 0 {
                Arc::clone(&first.function)
            } else {
                Arc::from("")
            },
        );
        if let Some(id) = self.locations.get(&key) {
            return *id;
        }
        let id = self.profile.locations.len() as u64 + 1;
        let lines = frames
            .iter()
            .map(|f| Line {
                function_id: self.function(f),
                line: i64::from(f.line),
            })
            .collect();
        self.profile.locations.push(Location {
            id,
            mapping_id: 1,
            address: first.pc,
            lines,
            is_folded: false,
        });
        self.locations.insert(key, id);
        id
    }

    fn label(&mut self, key: &str, value: &str) -> Label {
        Label {
            key: self.string(key),
            str: self.string(value),
            num: 0,
            num_unit: 0,
        }
    }
}

/// Writes `dump` as a gzipped profile.proto.
pub(super) fn write(dump: &Dump, out: &mut dyn Write) -> std::io::Result<()> {
    let mut b = Builder::default();
    b.string("");
    let word = b.string(dump.task_word);
    let count = b.string("count");
    b.profile.sample_types = vec![ValueType {
        r#type: word,
        unit: count,
    }];
    b.profile.period_type = Some(ValueType {
        r#type: word,
        unit: count,
    });
    b.profile.period = 1;
    b.profile.time_nanos = i64::try_from(dump.taken_unix_ns).unwrap_or(i64::MAX);
    let filename = b.string(&dump.process.exe);
    b.profile.mappings = vec![Mapping {
        id: 1,
        memory_start: 0,
        memory_limit: 0,
        file_offset: 0,
        filename,
        build_id: 0,
        has_functions: true,
        has_filenames: true,
        has_line_numbers: true,
        has_inline_frames: true,
    }];
    let notes: Vec<i64> = dump.notes.iter().map(|n| b.string(n)).collect();
    b.profile.comment = notes;
    let mut samples: HashMap<(Vec<u64>, Labels), i64> = HashMap::new();
    for t in &dump.tasks {
        let frames = frames_of(t);
        let mut ids = Vec::new();
        for call in physical(&frames) {
            ids.push(b.location(call));
        }
        *samples.entry((ids, Labels::of(t))).or_default() += 1;
    }
    let mut samples: Vec<_> = samples.into_iter().collect();
    samples.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    for ((location_ids, labels), n) in samples {
        let mut said = vec![b.label("state", labels.state)];
        if let Some(r) = &labels.wait_reason {
            said.push(b.label("wait_reason", r));
        }
        if let Some(v) = labels.verdict {
            said.push(b.label("verdict", v));
        }
        b.profile.samples.push(Sample {
            location_ids,
            values: vec![n],
            labels: said,
        });
    }
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    gz.write_all(&b.profile.encode_to_vec())?;
    gz.finish()?;
    Ok(())
}
