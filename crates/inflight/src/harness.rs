//! The harness operations on the public API: fill, copy, add and checksum
//! recorded through [`CommandBuffer::bind_span`] and
//! [`CommandBuffer::native`], and checksums read back from a [`Ticket`].
//!
//! These are what `repro`, the conformance suite and the tests record to see
//! whether memory was corrupted. They are built the way a program records
//! its own work: bind each buffer (which orders the work after any earlier
//! use the allocator reused it ahead of, and has commit stamp it), then
//! record into the backend's native command list at the buffer's offset.

use crate::backend::{Harness, Span};
use crate::error::{Error, Result};
use crate::{Buffer, CommandBuffer, Ticket};

impl<B: Harness> CommandBuffer<B> {
    /// Records: fill the whole buffer with `pattern`.
    pub fn fill(&mut self, dst: &Buffer<B>, pattern: u32) -> Result<()> {
        self.fill_span(dst, dst.span(), pattern)
    }

    /// Records: fill `dst[span]` with `pattern`.
    pub fn fill_span(&mut self, dst: &Buffer<B>, span: Span, pattern: u32) -> Result<()> {
        let d = self.bind_span(dst, span)?;
        let (backend, cmds) = self.native();
        backend.fill(cmds, d, span, pattern)?;
        Ok(())
    }

    /// Records: copy the first `min(len)` words of `src` to `dst`.
    pub fn copy(&mut self, src: &Buffer<B>, dst: &Buffer<B>) -> Result<()> {
        let span = Span::prefix(src.span().len.min(dst.span().len));
        self.copy_span(src, dst, span)
    }

    /// Records: `dst[span] = src[span]`.
    pub fn copy_span(&mut self, src: &Buffer<B>, dst: &Buffer<B>, span: Span) -> Result<()> {
        let s = self.bind_span(src, span)?;
        let d = self.bind_span(dst, span)?;
        let (backend, cmds) = self.native();
        backend.copy(cmds, s, d, span)?;
        Ok(())
    }

    /// Records: `out = a + b` (wrapping, per word) over the shortest of the three.
    pub fn add(&mut self, a: &Buffer<B>, b: &Buffer<B>, out: &Buffer<B>) -> Result<()> {
        let len = a.span().len.min(b.span().len).min(out.span().len);
        self.add_span(a, b, out, Span::prefix(len))
    }

    /// Records: `out[i] = a[i] + b[i]` (wrapping) over `span`.
    pub fn add_span(
        &mut self,
        a: &Buffer<B>,
        b: &Buffer<B>,
        out: &Buffer<B>,
        span: Span,
    ) -> Result<()> {
        let x = self.bind_span(a, span)?;
        let y = self.bind_span(b, span)?;
        let o = self.bind_span(out, span)?;
        let (backend, cmds) = self.native();
        backend.add(cmds, x, y, o, span)?;
        Ok(())
    }

    /// Records: checksum (see [`crate::backend::checksum_words`]) of `src[span]`
    /// into the next result slot; returns the slot, for [`Ticket::checksum`].
    pub fn checksum_span(&mut self, src: &Buffer<B>, span: Span) -> Result<usize> {
        let s = self.bind_span(src, span)?;
        let (backend, cmds) = self.native();
        Ok(backend.checksum(cmds, s, span)?)
    }

    /// Records: checksum of the whole buffer.
    pub fn checksum(&mut self, src: &Buffer<B>) -> Result<usize> {
        self.checksum_span(src, src.span())
    }
}

impl<B: Harness> Ticket<B> {
    /// Every checksum the submission recorded, in slot order. An error if
    /// it has not completed.
    pub fn checksums(&self) -> Result<Vec<u64>> {
        if !self.is_complete()? {
            return Err(Error::NotComplete {
                queue: self.queue_id(),
                value: self.value(),
            });
        }
        self.backend()
            .results(self.submission())
            .map_err(|e| self.error(e))
    }

    /// The checksum in `slot`. An error if it has not completed, or if the
    /// submission recorded no such slot.
    pub fn checksum(&self, slot: usize) -> Result<u64> {
        let recorded = self.backend().slots(self.submission());
        if slot >= recorded {
            return Err(Error::NoSuchSlot { slot, recorded });
        }
        let all = self.checksums()?;
        all.get(slot).copied().ok_or(Error::NoSuchSlot {
            slot,
            recorded: all.len(),
        })
    }
}
