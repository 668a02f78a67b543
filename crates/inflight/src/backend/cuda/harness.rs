//! The test harness's operations on CUDA ([`Harness`]): fills, copies,
//! adds and checksums recorded as kernel steps of a submission (see
//! `kernels.rs`), each span checked against its binding and raw buffer.

use super::*;

impl Harness for CudaGpu {
    fn fill(
        &self,
        cmds: &mut CudaCommands,
        dst: Binding<'_, CudaBuffer>,
        span: Span,
        pattern: u32,
    ) -> Result<(), DeviceError> {
        let dst = device_ptr(dst, span)?;
        cmds.steps.push(Step::Kernel(Op::Fill {
            dst,
            words: span.words(),
            pattern,
        }));
        Ok(())
    }

    fn copy(
        &self,
        cmds: &mut CudaCommands,
        src: Binding<'_, CudaBuffer>,
        dst: Binding<'_, CudaBuffer>,
        span: Span,
    ) -> Result<(), DeviceError> {
        let (src, dst) = (device_ptr(src, span)?, device_ptr(dst, span)?);
        cmds.steps.push(Step::Kernel(Op::Copy {
            src,
            dst,
            words: span.words(),
        }));
        Ok(())
    }

    fn add(
        &self,
        cmds: &mut CudaCommands,
        a: Binding<'_, CudaBuffer>,
        b: Binding<'_, CudaBuffer>,
        out: Binding<'_, CudaBuffer>,
        span: Span,
    ) -> Result<(), DeviceError> {
        let (a, b, out) = (
            device_ptr(a, span)?,
            device_ptr(b, span)?,
            device_ptr(out, span)?,
        );
        cmds.steps.push(Step::Kernel(Op::Add {
            a,
            b,
            out,
            words: span.words(),
        }));
        Ok(())
    }

    fn checksum(
        &self,
        cmds: &mut CudaCommands,
        src: Binding<'_, CudaBuffer>,
        span: Span,
    ) -> Result<usize, DeviceError> {
        let src = device_ptr(src, span)?;
        let slot = cmds.checksums;
        cmds.checksums += 1;
        cmds.steps.push(Step::Kernel(Op::Checksum {
            src,
            words: span.words(),
            slot,
        }));
        Ok(slot)
    }

    fn slots(&self, submission: &CudaSubmission) -> usize {
        submission.slots
    }

    fn results(&self, submission: &CudaSubmission) -> Result<Vec<u64>, DeviceError> {
        if submission.results.get().is_none() {
            submission.dev.ctx.make_current()?;
            submission.state.harvest(&submission.dev)?;
        }
        submission.results.get().cloned().ok_or_else(|| {
            DeviceError::Other("results asked for before the submission completed".into())
        })
    }
}

/// The device address of `span` of a binding, checked against the binding
/// and its raw buffer.
fn device_ptr(b: Binding<'_, CudaBuffer>, span: Span) -> Result<DevicePtr, DeviceError> {
    b.check(span)?;
    let abs = b.absolute(span);
    abs.check_fits(b.raw.size)?;
    Ok(b.raw.ptr + abs.offset)
}
