//! How a finished Metal command buffer's status and error become a
//! [`DeviceError`]: plain Rust over the raw numbers, so the mapping is
//! unit-tested on any platform.
//!
//! A command buffer that completes with status `MTLCommandBufferStatusError`
//! carries an `NSError` in `MTLCommandBufferErrorDomain` whose code is an
//! `MTLCommandBufferError`. Codes that end the device for this process
//! (`DeviceRemoved`, `AccessRevoked`) map to [`DeviceError::Lost`]; every
//! other code is one submission's failure, [`DeviceError::SubmissionFailed`],
//! which the allocator reports at the queue's next call and on the
//! submission's ticket.
//!
//! # The incident's error
//!
//! `MTLCommandBufferErrorInvalidResource` (code 9) is what the IOGPU driver
//! reports as `kIOGPUCommandBufferCallbackErrorInvalidResource` when a
//! command buffer used a resource that was deallocated before it ran: the
//! MLX incident, a release in flight of a buffer bound to a command buffer
//! made with unretained references. Its reason names it so
//! ([`INCIDENT_ERROR`]), whatever the driver's own description says.

use crate::backend::DeviceError;

/// The driver's name for the incident's error, as it appears in crash logs.
pub const INCIDENT_ERROR: &str = "kIOGPUCommandBufferCallbackErrorInvalidResource";

/// What Metal's validation layer says about the same defect.
pub const INCIDENT_VALIDATION_MESSAGE: &str = "command buffer references deallocated object";

/// The `NSError` domain of command-buffer errors.
pub const ERROR_DOMAIN: &str = "MTLCommandBufferErrorDomain";

/// `MTLCommandBufferStatus`, from its raw value.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum CommandBufferStatus {
    /// 0: not yet enqueued.
    NotEnqueued,
    /// 1: enqueued.
    Enqueued,
    /// 2: committed.
    Committed,
    /// 3: scheduled on the GPU.
    Scheduled,
    /// 4: completed without error.
    Completed,
    /// 5: completed with an error (see [`CommandBufferError`]).
    Error,
    /// A value this version does not know.
    Unknown(u64),
}

impl CommandBufferStatus {
    /// The status of raw value `raw`.
    pub const fn from_raw(raw: u64) -> Self {
        match raw {
            0 => Self::NotEnqueued,
            1 => Self::Enqueued,
            2 => Self::Committed,
            3 => Self::Scheduled,
            4 => Self::Completed,
            5 => Self::Error,
            other => Self::Unknown(other),
        }
    }
}

/// `MTLCommandBufferError`, from the code of an `NSError` in
/// [`ERROR_DOMAIN`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum CommandBufferError {
    /// 0: no error.
    None,
    /// 1: an internal error.
    Internal,
    /// 2: the GPU ran past its watchdog.
    Timeout,
    /// 3: the GPU touched an address it has no mapping for.
    PageFault,
    /// 4: the process's GPU access was revoked (formerly `Blacklisted`).
    AccessRevoked,
    /// 7: the process may not use the GPU now (in the background, say).
    NotPermitted,
    /// 8: the GPU ran out of memory.
    OutOfMemory,
    /// 9: a resource the command buffer used was invalid: on Apple silicon,
    /// deallocated before the command buffer ran ([`INCIDENT_ERROR`]).
    InvalidResource,
    /// 10: memoryless render targets ran out of memory.
    Memoryless,
    /// 11: the device was removed.
    DeviceRemoved,
    /// 12: a shader's stack overflowed.
    StackOverflow,
    /// A code this version does not know, or an error in another domain.
    Other(i64),
}

impl CommandBufferError {
    /// The error of code `code` in [`ERROR_DOMAIN`].
    pub const fn from_code(code: i64) -> Self {
        match code {
            0 => Self::None,
            1 => Self::Internal,
            2 => Self::Timeout,
            3 => Self::PageFault,
            4 => Self::AccessRevoked,
            7 => Self::NotPermitted,
            8 => Self::OutOfMemory,
            9 => Self::InvalidResource,
            10 => Self::Memoryless,
            11 => Self::DeviceRemoved,
            12 => Self::StackOverflow,
            other => Self::Other(other),
        }
    }

    /// The error of an `NSError` with `domain` and `code`: an error of
    /// another domain is [`CommandBufferError::Other`].
    pub fn from_ns_error(domain: &str, code: i64) -> Self {
        if domain == ERROR_DOMAIN {
            Self::from_code(code)
        } else {
            Self::Other(code)
        }
    }

    /// Metal's name for the code.
    pub const fn name(self) -> &'static str {
        match self {
            Self::None => "MTLCommandBufferErrorNone",
            Self::Internal => "MTLCommandBufferErrorInternal",
            Self::Timeout => "MTLCommandBufferErrorTimeout",
            Self::PageFault => "MTLCommandBufferErrorPageFault",
            Self::AccessRevoked => "MTLCommandBufferErrorAccessRevoked",
            Self::NotPermitted => "MTLCommandBufferErrorNotPermitted",
            Self::OutOfMemory => "MTLCommandBufferErrorOutOfMemory",
            Self::InvalidResource => "MTLCommandBufferErrorInvalidResource",
            Self::Memoryless => "MTLCommandBufferErrorMemoryless",
            Self::DeviceRemoved => "MTLCommandBufferErrorDeviceRemoved",
            Self::StackOverflow => "MTLCommandBufferErrorStackOverflow",
            Self::Other(_) => "an unknown command-buffer error",
        }
    }

    /// Whether nothing more will run on the device for this process.
    pub const fn loses_device(self) -> bool {
        matches!(self, Self::DeviceRemoved | Self::AccessRevoked)
    }
}

/// What a finished command buffer reported: its status and, with
/// [`CommandBufferStatus::Error`], its error's code and description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished<'a> {
    /// The command buffer's status when its completed handler ran.
    pub status: CommandBufferStatus,
    /// The `NSError`'s code, mapped (`None`: no error object).
    pub error: Option<CommandBufferError>,
    /// The `NSError`'s localized description (may be empty).
    pub description: &'a str,
}

impl Finished<'_> {
    /// The error submission `value` completed with, or `None` if it
    /// completed cleanly. See the module documentation for the mapping.
    pub fn failure(&self, value: u64) -> Option<DeviceError> {
        let code = match (self.status, self.error) {
            (CommandBufferStatus::Completed, None | Some(CommandBufferError::None)) => return None,
            // A completed handler sees Completed or Error; anything else is
            // reported rather than taken for success.
            (CommandBufferStatus::Completed | CommandBufferStatus::Error, code) => code,
            (other, code) => {
                return Some(DeviceError::SubmissionFailed {
                    value,
                    reason: format!(
                        "the command buffer finished with status {other:?}{}",
                        code.map_or(String::new(), |c| format!(" ({})", c.name()))
                    ),
                });
            }
        };
        let code = code.unwrap_or(CommandBufferError::Other(0));
        let said = self.description.trim();
        let said = if said.is_empty() {
            String::new()
        } else {
            format!(": {said}")
        };
        // The driver's own wording, in case it comes with another code.
        let incident = code == CommandBufferError::InvalidResource
            || self.description.contains(INCIDENT_ERROR);
        let reason = if incident {
            format!(
                "{INCIDENT_ERROR} ({}): the command buffer used a buffer that was released \
                 while it was in flight (Metal's validation layer: \"{INCIDENT_VALIDATION_MESSAGE}\"){said}",
                CommandBufferError::InvalidResource.name()
            )
        } else {
            match code {
                CommandBufferError::Other(raw) => {
                    format!("command buffer error with code {raw}{said}")
                }
                known => format!("{}{said}", known.name()),
            }
        };
        if code.loses_device() {
            Some(DeviceError::Lost(reason))
        } else {
            Some(DeviceError::SubmissionFailed { value, reason })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(status: u64, error: Option<i64>, description: &str) -> Finished<'_> {
        Finished {
            status: CommandBufferStatus::from_raw(status),
            error: error.map(|c| CommandBufferError::from_ns_error(ERROR_DOMAIN, c)),
            description,
        }
    }

    #[test]
    fn a_clean_completion_is_no_failure() {
        assert_eq!(finished(4, None, "").failure(3), None);
        assert_eq!(finished(4, Some(0), "").failure(3), None);
    }

    #[test]
    fn invalid_resource_is_named_as_the_incidents_error() {
        let e = finished(5, Some(9), "Discarded (victim of GPU error/recovery)").failure(7);
        match e {
            Some(DeviceError::SubmissionFailed { value, reason }) => {
                assert_eq!(value, 7);
                assert!(reason.contains(INCIDENT_ERROR), "{reason}");
                assert!(reason.contains(INCIDENT_VALIDATION_MESSAGE), "{reason}");
                assert!(reason.contains("MTLCommandBufferErrorInvalidResource"));
                assert!(reason.contains("victim of GPU error"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_drivers_wording_is_recognised_under_another_code() {
        let text = "Internal Error (0000000e:kIOGPUCommandBufferCallbackErrorInvalidResource)";
        let Some(DeviceError::SubmissionFailed { reason, .. }) =
            finished(5, Some(1), text).failure(2)
        else {
            panic!("not a submission failure");
        };
        assert!(reason.starts_with(INCIDENT_ERROR), "{reason}");
    }

    #[test]
    fn device_removal_and_revoked_access_lose_the_device() {
        for code in [11, 4] {
            match finished(5, Some(code), "gone").failure(1) {
                Some(DeviceError::Lost(reason)) => assert!(reason.contains("gone")),
                other => panic!("code {code}: {other:?}"),
            }
        }
    }

    #[test]
    fn other_codes_fail_one_submission() {
        for (code, name) in [
            (1, "Internal"),
            (2, "Timeout"),
            (3, "PageFault"),
            (7, "NotPermitted"),
            (8, "OutOfMemory"),
            (12, "StackOverflow"),
        ] {
            match finished(5, Some(code), "").failure(4) {
                Some(DeviceError::SubmissionFailed { value: 4, reason }) => {
                    assert_eq!(reason, format!("MTLCommandBufferError{name}"))
                }
                other => panic!("code {code}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_codes_domains_and_statuses_are_failures_not_panics() {
        let e = finished(5, Some(99), "").failure(1);
        assert!(
            matches!(e, Some(DeviceError::SubmissionFailed { ref reason, .. }) if reason.contains("99"))
        );
        let other_domain = Finished {
            status: CommandBufferStatus::Error,
            error: Some(CommandBufferError::from_ns_error("NSPOSIXErrorDomain", 9)),
            description: "",
        };
        assert!(matches!(
            other_domain.failure(1),
            Some(DeviceError::SubmissionFailed { ref reason, .. }) if !reason.contains(INCIDENT_ERROR)
        ));
        // An error status without an error object is still a failure.
        assert!(finished(5, None, "").failure(1).is_some());
        // A handler that sees a status other than Completed or Error.
        assert!(matches!(
            finished(3, None, "").failure(1),
            Some(DeviceError::SubmissionFailed { ref reason, .. }) if reason.contains("Scheduled")
        ));
        assert_eq!(
            CommandBufferStatus::from_raw(77),
            CommandBufferStatus::Unknown(77)
        );
    }
}
