//! Build script: compiles the Vulkan backend's WGSL shaders to SPIR-V with
//! naga when the `vulkan` feature is on, so that building needs no tool
//! outside cargo. Each `src/backend/vulkan/shaders/<op>.wgsl` is prefixed with
//! `common.wgsl`, validated, and written to `$OUT_DIR/<op>.spv`.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "vulkan")]
    shaders::compile_all();
}

#[cfg(feature = "vulkan")]
mod shaders {
    use std::path::{Path, PathBuf};

    const DIR: &str = "src/backend/vulkan/shaders";
    const OPS: [&str; 4] = ["fill", "copy", "add", "checksum"];

    pub fn compile_all() {
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let common = read(&Path::new(DIR).join("common.wgsl"));
        for op in OPS {
            let path = Path::new(DIR).join(format!("{op}.wgsl"));
            let source = format!("{common}\n{}", read(&path));
            let words = compile(&path, &source);
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            std::fs::write(out.join(format!("{op}.spv")), bytes).expect("write SPIR-V to OUT_DIR");
        }
    }

    fn read(path: &Path) -> String {
        println!("cargo:rerun-if-changed={}", path.display());
        std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("cannot read shader {}: {e}", path.display()))
    }

    fn compile(path: &Path, source: &str) -> Vec<u32> {
        use naga::back::spv;
        use naga::valid::{Capabilities, ValidationFlags, Validator};

        let module = naga::front::wgsl::parse_str(source).unwrap_or_else(|e| {
            panic!("{}: {}", path.display(), e.emit_to_string(source));
        });
        let info = Validator::new(ValidationFlags::all(), Capabilities::PUSH_CONSTANT)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.emit_to_string(source)));
        let options = spv::Options {
            lang_version: (1, 3),
            ..spv::Options::default()
        };
        let pipeline = spv::PipelineOptions {
            shader_stage: naga::ShaderStage::Compute,
            entry_point: "main".into(),
        };
        spv::write_vec(&module, &info, &options, Some(&pipeline))
            .unwrap_or_else(|e| panic!("{}: SPIR-V generation failed: {e}", path.display()))
    }
}
