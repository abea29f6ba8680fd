//! The calls into librdkafka's C admin API. This is the only module of the
//! workspace that allows unsafe code: rdkafka wraps no ACL, SCRAM or consumer
//! group offset API, and librdkafka (the same library rdkafka links, through
//! rdkafka-sys) has them.
//!
//! Ownership rules this module keeps (librdkafka's admin API contract):
//! - every object it creates (queue, options, ACL bindings and filters, SCRAM
//!   alterations, events) is held by an [`Owned`] that destroys it exactly once;
//! - request arguments are copied by librdkafka during the call, so they only
//!   need to outlive the call;
//! - results belong to their event: they are read into Rust values before the
//!   event is destroyed;
//! - the reply queue is reference-counted by librdkafka: destroying ours after a
//!   timeout, while a request is still in flight, is safe.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int};
use std::ptr;
use std::time::{Duration, Instant};

use rdkafka::bindings as rd;
use rdkafka::error::RDKafkaErrorCode;

use crate::{
    AclBinding, AclFilter, AdminError, CommittedOffset, Operation, PatternType, Permission,
    ResourceType, SCRAM_ITERATIONS, ScramMechanism,
};

const ERRSTR_SIZE: usize = 512;

/// A librdkafka object this module created, destroyed on drop.
struct Owned<T> {
    ptr: *mut T,
    destroy: unsafe extern "C" fn(*mut T),
}

impl<T> Owned<T> {
    /// None when librdkafka returned NULL.
    fn new(ptr: *mut T, destroy: unsafe extern "C" fn(*mut T)) -> Option<Self> {
        (!ptr.is_null()).then_some(Owned { ptr, destroy })
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: `ptr` is non-null, was returned by the librdkafka constructor
        // matching `destroy`, and is destroyed only here, once.
        unsafe { (self.destroy)(self.ptr) }
    }
}

fn c_string(operation: &'static str, text: &str) -> Result<CString, AdminError> {
    CString::new(text).map_err(|_| AdminError::Invalid {
        operation,
        message: format!("{text:?} contains a NUL byte"),
    })
}

/// Copies a C string librdkafka returned (None for NULL).
fn read_c_str(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: librdkafka returns NUL-terminated strings that live as long as
    // the object they belong to, which the caller still holds.
    Some(
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned(),
    )
}

fn errstr_message(errstr: &[c_char]) -> String {
    // SAFETY: librdkafka writes a NUL-terminated message within `errstr`'s
    // size; the buffer starts zeroed, so it is terminated even when untouched.
    unsafe { CStr::from_ptr(errstr.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The error a result object carries, if any.
fn result_error(operation: &'static str, error: *const rd::rd_kafka_error_t) -> Option<AdminError> {
    if error.is_null() {
        return None;
    }
    // SAFETY: `error` is non-null and belongs to a result the caller holds.
    let code = unsafe { rd::rd_kafka_error_code(error) };
    if code == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return None;
    }
    // SAFETY: as above.
    let message = read_c_str(unsafe { rd::rd_kafka_error_string(error) }).unwrap_or_default();
    Some(AdminError::Kafka {
        operation,
        code: RDKafkaErrorCode::from(code),
        message,
    })
}

fn resource_type(t: ResourceType) -> rd::rd_kafka_ResourceType_t {
    use rd::rd_kafka_ResourceType_t::*;
    match t {
        ResourceType::Topic => RD_KAFKA_RESOURCE_TOPIC,
        ResourceType::Group => RD_KAFKA_RESOURCE_GROUP,
        ResourceType::TransactionalId => RD_KAFKA_RESOURCE_TRANSACTIONAL_ID,
        // Kafka's CLUSTER resource type has librdkafka's BROKER code (4).
        ResourceType::Cluster => RD_KAFKA_RESOURCE_BROKER,
    }
}

fn resource_type_back(t: rd::rd_kafka_ResourceType_t) -> Option<ResourceType> {
    use rd::rd_kafka_ResourceType_t::*;
    match t {
        RD_KAFKA_RESOURCE_TOPIC => Some(ResourceType::Topic),
        RD_KAFKA_RESOURCE_GROUP => Some(ResourceType::Group),
        RD_KAFKA_RESOURCE_TRANSACTIONAL_ID => Some(ResourceType::TransactionalId),
        RD_KAFKA_RESOURCE_BROKER => Some(ResourceType::Cluster),
        _ => None,
    }
}

fn pattern_type(p: PatternType) -> rd::rd_kafka_ResourcePatternType_t {
    use rd::rd_kafka_ResourcePatternType_t::*;
    match p {
        PatternType::Literal => RD_KAFKA_RESOURCE_PATTERN_LITERAL,
        PatternType::Prefixed => RD_KAFKA_RESOURCE_PATTERN_PREFIXED,
    }
}

fn pattern_type_back(p: rd::rd_kafka_ResourcePatternType_t) -> Option<PatternType> {
    use rd::rd_kafka_ResourcePatternType_t::*;
    match p {
        RD_KAFKA_RESOURCE_PATTERN_LITERAL => Some(PatternType::Literal),
        RD_KAFKA_RESOURCE_PATTERN_PREFIXED => Some(PatternType::Prefixed),
        _ => None,
    }
}

const OPERATIONS: [(Operation, rd::rd_kafka_AclOperation_t); 11] = {
    use rd::rd_kafka_AclOperation_t::*;
    [
        (Operation::All, RD_KAFKA_ACL_OPERATION_ALL),
        (Operation::Read, RD_KAFKA_ACL_OPERATION_READ),
        (Operation::Write, RD_KAFKA_ACL_OPERATION_WRITE),
        (Operation::Create, RD_KAFKA_ACL_OPERATION_CREATE),
        (Operation::Delete, RD_KAFKA_ACL_OPERATION_DELETE),
        (Operation::Alter, RD_KAFKA_ACL_OPERATION_ALTER),
        (Operation::Describe, RD_KAFKA_ACL_OPERATION_DESCRIBE),
        (
            Operation::ClusterAction,
            RD_KAFKA_ACL_OPERATION_CLUSTER_ACTION,
        ),
        (
            Operation::DescribeConfigs,
            RD_KAFKA_ACL_OPERATION_DESCRIBE_CONFIGS,
        ),
        (
            Operation::AlterConfigs,
            RD_KAFKA_ACL_OPERATION_ALTER_CONFIGS,
        ),
        (
            Operation::IdempotentWrite,
            RD_KAFKA_ACL_OPERATION_IDEMPOTENT_WRITE,
        ),
    ]
};

fn operation(o: Operation) -> rd::rd_kafka_AclOperation_t {
    OPERATIONS
        .iter()
        .find(|(ours, _)| *ours == o)
        .map(|(_, theirs)| *theirs)
        .unwrap_or(rd::rd_kafka_AclOperation_t::RD_KAFKA_ACL_OPERATION_UNKNOWN)
}

fn operation_back(o: rd::rd_kafka_AclOperation_t) -> Option<Operation> {
    OPERATIONS
        .iter()
        .find(|(_, theirs)| *theirs == o)
        .map(|(ours, _)| *ours)
}

fn permission(p: Permission) -> rd::rd_kafka_AclPermissionType_t {
    match p {
        Permission::Allow => rd::rd_kafka_AclPermissionType_t::RD_KAFKA_ACL_PERMISSION_TYPE_ALLOW,
        Permission::Deny => rd::rd_kafka_AclPermissionType_t::RD_KAFKA_ACL_PERMISSION_TYPE_DENY,
    }
}

fn permission_back(p: rd::rd_kafka_AclPermissionType_t) -> Option<Permission> {
    match p {
        rd::rd_kafka_AclPermissionType_t::RD_KAFKA_ACL_PERMISSION_TYPE_ALLOW => {
            Some(Permission::Allow)
        }
        rd::rd_kafka_AclPermissionType_t::RD_KAFKA_ACL_PERMISSION_TYPE_DENY => {
            Some(Permission::Deny)
        }
        _ => None,
    }
}

type Binding = Owned<rd::rd_kafka_AclBinding_t>;

fn new_binding(operation_name: &'static str, b: &AclBinding) -> Result<Binding, AdminError> {
    let name = c_string(operation_name, &b.name)?;
    let principal = c_string(operation_name, &b.principal)?;
    let host = c_string(operation_name, &b.host)?;
    let mut errstr = [0 as c_char; ERRSTR_SIZE];
    // SAFETY: the strings are valid NUL-terminated C strings for the call's
    // duration (librdkafka copies them); `errstr` is writable for its size.
    let ptr = unsafe {
        rd::rd_kafka_AclBinding_new(
            resource_type(b.resource_type),
            name.as_ptr(),
            pattern_type(b.pattern),
            principal.as_ptr(),
            host.as_ptr(),
            operation(b.operation),
            permission(b.permission),
            errstr.as_mut_ptr(),
            ERRSTR_SIZE,
        )
    };
    Owned::new(ptr, rd::rd_kafka_AclBinding_destroy).ok_or_else(|| AdminError::Invalid {
        operation: operation_name,
        message: format!("{b}: {}", errstr_message(&errstr)),
    })
}

fn new_filter(operation_name: &'static str, f: &AclFilter) -> Result<Binding, AdminError> {
    let name = f
        .name
        .as_deref()
        .map(|n| c_string(operation_name, n))
        .transpose()?;
    let principal = f
        .principal
        .as_deref()
        .map(|p| c_string(operation_name, p))
        .transpose()?;
    let mut errstr = [0 as c_char; ERRSTR_SIZE];
    // SAFETY: as in `new_binding`; NULL name, principal and host match any.
    let ptr = unsafe {
        rd::rd_kafka_AclBindingFilter_new(
            f.resource_type.map_or(
                rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_ANY,
                resource_type,
            ),
            name.as_ref().map_or(ptr::null(), |n| n.as_ptr()),
            f.pattern.map_or(
                rd::rd_kafka_ResourcePatternType_t::RD_KAFKA_RESOURCE_PATTERN_ANY,
                pattern_type,
            ),
            principal.as_ref().map_or(ptr::null(), |p| p.as_ptr()),
            ptr::null(),
            f.operation.map_or(
                rd::rd_kafka_AclOperation_t::RD_KAFKA_ACL_OPERATION_ANY,
                operation,
            ),
            rd::rd_kafka_AclPermissionType_t::RD_KAFKA_ACL_PERMISSION_TYPE_ANY,
            errstr.as_mut_ptr(),
            ERRSTR_SIZE,
        )
    };
    Owned::new(ptr, rd::rd_kafka_AclBinding_destroy).ok_or_else(|| AdminError::Invalid {
        operation: operation_name,
        message: format!("{f:?}: {}", errstr_message(&errstr)),
    })
}

/// Reads a binding librdkafka returned; None for kinds this crate does not model.
fn read_binding(ptr: *const rd::rd_kafka_AclBinding_t) -> Option<AclBinding> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: `ptr` is a binding owned by a result (or by the caller) that
    // outlives this function; the accessors only read it.
    unsafe {
        Some(AclBinding {
            resource_type: resource_type_back(rd::rd_kafka_AclBinding_restype(ptr))?,
            name: read_c_str(rd::rd_kafka_AclBinding_name(ptr))?,
            pattern: pattern_type_back(rd::rd_kafka_AclBinding_resource_pattern_type(ptr))?,
            principal: read_c_str(rd::rd_kafka_AclBinding_principal(ptr))?,
            host: read_c_str(rd::rd_kafka_AclBinding_host(ptr))?,
            operation: operation_back(rd::rd_kafka_AclBinding_operation(ptr))?,
            permission: permission_back(rd::rd_kafka_AclBinding_permission_type(ptr))?,
        })
    }
}

/// Builds a binding in librdkafka and reads it back (for tests of the conversions).
#[cfg(test)]
pub(crate) fn round_trip(b: &AclBinding) -> Result<AclBinding, AdminError> {
    let binding = new_binding("round trip", b)?;
    read_binding(binding.ptr).ok_or(AdminError::Invalid {
        operation: "round trip",
        message: "unreadable".to_owned(),
    })
}

/// One admin request: its reply queue and options.
struct Request {
    operation: &'static str,
    timeout: Duration,
    queue: Owned<rd::rd_kafka_queue_t>,
    options: Owned<rd::rd_kafka_AdminOptions_t>,
}

impl Request {
    fn new(
        rk: *mut rd::rd_kafka_t,
        api: rd::rd_kafka_admin_op_t,
        operation: &'static str,
        timeout: Duration,
    ) -> Result<Self, AdminError> {
        let invalid = |message: String| AdminError::Invalid { operation, message };
        // SAFETY: `rk` is the live handle of the caller's client, which
        // outlives the request.
        let queue = Owned::new(
            unsafe { rd::rd_kafka_queue_new(rk) },
            rd::rd_kafka_queue_destroy,
        )
        .ok_or_else(|| invalid("no reply queue".to_owned()))?;
        // SAFETY: as above.
        let options = Owned::new(
            unsafe { rd::rd_kafka_AdminOptions_new(rk, api) },
            rd::rd_kafka_AdminOptions_destroy,
        )
        .ok_or_else(|| invalid("no admin options".to_owned()))?;
        let mut errstr = [0 as c_char; ERRSTR_SIZE];
        let ms = c_int::try_from(timeout.as_millis()).unwrap_or(c_int::MAX);
        // SAFETY: `options` is live; `errstr` is writable for its size.
        let err = unsafe {
            rd::rd_kafka_AdminOptions_set_request_timeout(
                options.ptr,
                ms,
                errstr.as_mut_ptr(),
                ERRSTR_SIZE,
            )
        };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(invalid(errstr_message(&errstr)));
        }
        Ok(Request {
            operation,
            timeout,
            queue,
            options,
        })
    }

    /// Waits for the request's result event; a request-level error is returned
    /// as an error. librdkafka's own request timeout answers first; the
    /// deadline here only guards against an answer that never comes.
    fn wait(&self, expected: c_int) -> Result<Owned<rd::rd_kafka_event_t>, AdminError> {
        let deadline = Instant::now() + self.timeout + Duration::from_secs(2);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AdminError::Timeout {
                    operation: self.operation,
                    after: self.timeout,
                });
            }
            let ms = c_int::try_from(left.as_millis().min(1000)).unwrap_or(1000);
            // SAFETY: the queue is live; the returned event (if any) is ours to destroy.
            let event = unsafe { rd::rd_kafka_queue_poll(self.queue.ptr, ms) };
            let Some(event) = Owned::new(event, rd::rd_kafka_event_destroy) else {
                continue;
            };
            // SAFETY: the event is live.
            if unsafe { rd::rd_kafka_event_type(event.ptr) } != expected {
                continue;
            }
            // SAFETY: the event is live.
            let code = unsafe { rd::rd_kafka_event_error(event.ptr) };
            if code != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                // SAFETY: the event is live; its error string lives as long.
                let message = read_c_str(unsafe { rd::rd_kafka_event_error_string(event.ptr) })
                    .unwrap_or_default();
                return Err(AdminError::Kafka {
                    operation: self.operation,
                    code: RDKafkaErrorCode::from(code),
                    message,
                });
            }
            return Ok(event);
        }
    }
}

fn missing_result(operation: &'static str) -> AdminError {
    AdminError::Invalid {
        operation,
        message: "the result event holds no result".to_owned(),
    }
}

/// The `n` pointers of a result array librdkafka returned.
fn pointers<T>(array: *mut *const T, n: usize) -> Vec<*const T> {
    if array.is_null() {
        return Vec::new();
    }
    // SAFETY: librdkafka returned an array of `n` pointers, owned by the
    // result the caller holds.
    unsafe { std::slice::from_raw_parts(array, n) }.to_vec()
}

pub(crate) fn create_acls(
    rk: *mut rd::rd_kafka_t,
    acls: &[AclBinding],
    timeout: Duration,
) -> Result<(), AdminError> {
    const OP: &str = "creating ACLs";
    let bindings = acls
        .iter()
        .map(|b| new_binding(OP, b))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ptrs: Vec<*mut rd::rd_kafka_AclBinding_t> = bindings.iter().map(|b| b.ptr).collect();
    let request = Request::new(
        rk,
        rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_CREATEACLS,
        OP,
        timeout,
    )?;
    // SAFETY: `ptrs` holds live bindings (copied by librdkafka during the
    // call); options and queue are live.
    unsafe {
        rd::rd_kafka_CreateAcls(
            rk,
            ptrs.as_mut_ptr(),
            ptrs.len(),
            request.options.ptr,
            request.queue.ptr,
        )
    };
    let event = request.wait(rd::RD_KAFKA_EVENT_CREATEACLS_RESULT)?;
    // SAFETY: the event is live and of this type.
    let result = unsafe { rd::rd_kafka_event_CreateAcls_result(event.ptr) };
    if result.is_null() {
        return Err(missing_result(OP));
    }
    let mut n = 0;
    // SAFETY: `result` belongs to the live event.
    let array = unsafe { rd::rd_kafka_CreateAcls_result_acls(result, &mut n) };
    for (acl, binding) in pointers(array, n).into_iter().zip(acls) {
        // SAFETY: `acl` belongs to the live event.
        if let Some(error) = result_error(OP, unsafe { rd::rd_kafka_acl_result_error(acl) }) {
            return Err(match error {
                AdminError::Kafka { code, message, .. } => AdminError::Kafka {
                    operation: OP,
                    code,
                    message: format!("{binding}: {message}"),
                },
                other => other,
            });
        }
    }
    Ok(())
}

pub(crate) fn describe_acls(
    rk: *mut rd::rd_kafka_t,
    filter: &AclFilter,
    timeout: Duration,
) -> Result<Vec<AclBinding>, AdminError> {
    const OP: &str = "describing ACLs";
    let filter = new_filter(OP, filter)?;
    let request = Request::new(
        rk,
        rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBEACLS,
        OP,
        timeout,
    )?;
    // SAFETY: the filter, options and queue are live; librdkafka copies the filter.
    unsafe { rd::rd_kafka_DescribeAcls(rk, filter.ptr, request.options.ptr, request.queue.ptr) };
    let event = request.wait(rd::RD_KAFKA_EVENT_DESCRIBEACLS_RESULT)?;
    // SAFETY: the event is live and of this type.
    let result = unsafe { rd::rd_kafka_event_DescribeAcls_result(event.ptr) };
    if result.is_null() {
        return Err(missing_result(OP));
    }
    let mut n = 0;
    // SAFETY: `result` belongs to the live event.
    let array = unsafe { rd::rd_kafka_DescribeAcls_result_acls(result, &mut n) };
    Ok(pointers(array, n)
        .into_iter()
        .filter_map(read_binding)
        .collect())
}

pub(crate) fn delete_acls(
    rk: *mut rd::rd_kafka_t,
    filters: &[AclFilter],
    timeout: Duration,
) -> Result<Vec<AclBinding>, AdminError> {
    const OP: &str = "deleting ACLs";
    let filters = filters
        .iter()
        .map(|f| new_filter(OP, f))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ptrs: Vec<*mut rd::rd_kafka_AclBinding_t> = filters.iter().map(|f| f.ptr).collect();
    let request = Request::new(
        rk,
        rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DELETEACLS,
        OP,
        timeout,
    )?;
    // SAFETY: `ptrs` holds live filters (copied during the call); options and queue are live.
    unsafe {
        rd::rd_kafka_DeleteAcls(
            rk,
            ptrs.as_mut_ptr(),
            ptrs.len(),
            request.options.ptr,
            request.queue.ptr,
        )
    };
    let event = request.wait(rd::RD_KAFKA_EVENT_DELETEACLS_RESULT)?;
    // SAFETY: the event is live and of this type.
    let result = unsafe { rd::rd_kafka_event_DeleteAcls_result(event.ptr) };
    if result.is_null() {
        return Err(missing_result(OP));
    }
    let mut n = 0;
    // SAFETY: `result` belongs to the live event.
    let responses = unsafe { rd::rd_kafka_DeleteAcls_result_responses(result, &mut n) };
    let mut deleted = Vec::new();
    for response in pointers(responses, n) {
        // SAFETY: `response` belongs to the live event.
        if let Some(error) = result_error(OP, unsafe {
            rd::rd_kafka_DeleteAcls_result_response_error(response)
        }) {
            return Err(error);
        }
        let mut m = 0;
        // SAFETY: as above.
        let matching =
            unsafe { rd::rd_kafka_DeleteAcls_result_response_matching_acls(response, &mut m) };
        deleted.extend(pointers(matching, m).into_iter().filter_map(read_binding));
    }
    Ok(deleted)
}

pub(crate) fn alter_scram(
    rk: *mut rd::rd_kafka_t,
    user: &str,
    mechanism: ScramMechanism,
    password: Option<&[u8]>,
    timeout: Duration,
) -> Result<(), AdminError> {
    let op: &'static str = if password.is_some() {
        "upserting a SCRAM credential"
    } else {
        "deleting a SCRAM credential"
    };
    let user_c = c_string(op, user)?;
    let mechanism = match mechanism {
        ScramMechanism::Sha256 => rd::rd_kafka_ScramMechanism_t::RD_KAFKA_SCRAM_MECHANISM_SHA_256,
        ScramMechanism::Sha512 => rd::rd_kafka_ScramMechanism_t::RD_KAFKA_SCRAM_MECHANISM_SHA_512,
    };
    let alteration = match password {
        // SAFETY: `user_c` and `password` are valid for the call (librdkafka
        // copies them); a NULL salt makes librdkafka generate a random one.
        Some(password) => unsafe {
            rd::rd_kafka_UserScramCredentialUpsertion_new(
                user_c.as_ptr(),
                mechanism,
                SCRAM_ITERATIONS,
                password.as_ptr(),
                password.len(),
                ptr::null(),
                0,
            )
        },
        // SAFETY: `user_c` is valid for the call.
        None => unsafe { rd::rd_kafka_UserScramCredentialDeletion_new(user_c.as_ptr(), mechanism) },
    };
    let alteration = Owned::new(
        alteration,
        rd::rd_kafka_UserScramCredentialAlteration_destroy,
    )
    .ok_or(AdminError::Invalid {
        operation: op,
        message: format!("librdkafka refused the alteration of {user:?}"),
    })?;
    let mut ptrs = [alteration.ptr];
    let request = Request::new(
        rk,
        rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_ALTERUSERSCRAMCREDENTIALS,
        op,
        timeout,
    )?;
    // SAFETY: the alteration, options and queue are live; librdkafka copies the alteration.
    unsafe {
        rd::rd_kafka_AlterUserScramCredentials(
            rk,
            ptrs.as_mut_ptr(),
            ptrs.len(),
            request.options.ptr,
            request.queue.ptr,
        )
    };
    let event = request.wait(rd::RD_KAFKA_EVENT_ALTERUSERSCRAMCREDENTIALS_RESULT)?;
    // SAFETY: the event is live and of this type.
    let result = unsafe { rd::rd_kafka_event_AlterUserScramCredentials_result(event.ptr) };
    if result.is_null() {
        return Err(missing_result(op));
    }
    let mut n = 0;
    // SAFETY: `result` belongs to the live event.
    let responses =
        unsafe { rd::rd_kafka_AlterUserScramCredentials_result_responses(result, &mut n) };
    for response in pointers(responses, n) {
        // SAFETY: `response` belongs to the live event.
        let error =
            unsafe { rd::rd_kafka_AlterUserScramCredentials_result_response_error(response) };
        if let Some(error) = result_error(op, error) {
            return Err(error);
        }
    }
    Ok(())
}

/// `rk` must be a consumer handle with a group (see `GroupOffsets`): on a
/// coordinator change librdkafka dereferences the handle's own group.
pub(crate) fn committed_offsets(
    rk: *mut rd::rd_kafka_t,
    group: &str,
    timeout: Duration,
) -> Result<Vec<CommittedOffset>, AdminError> {
    const OP: &str = "listing a consumer group's offsets";
    let group_c = c_string(OP, group)?;
    // SAFETY: `group_c` is valid for the call (librdkafka copies it); NULL
    // partitions asks for every partition the group has committed on.
    let query = unsafe { rd::rd_kafka_ListConsumerGroupOffsets_new(group_c.as_ptr(), ptr::null()) };
    let query = Owned::new(query, rd::rd_kafka_ListConsumerGroupOffsets_destroy).ok_or(
        AdminError::Invalid {
            operation: OP,
            message: format!("librdkafka refused the query of group {group:?}"),
        },
    )?;
    let mut ptrs = [query.ptr];
    let request = Request::new(
        rk,
        rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_LISTCONSUMERGROUPOFFSETS,
        OP,
        timeout,
    )?;
    // SAFETY: the query, options and queue are live; librdkafka copies the query.
    unsafe {
        rd::rd_kafka_ListConsumerGroupOffsets(
            rk,
            ptrs.as_mut_ptr(),
            ptrs.len(),
            request.options.ptr,
            request.queue.ptr,
        )
    };
    let event = request.wait(rd::RD_KAFKA_EVENT_LISTCONSUMERGROUPOFFSETS_RESULT)?;
    // SAFETY: the event is live and of this type.
    let result = unsafe { rd::rd_kafka_event_ListConsumerGroupOffsets_result(event.ptr) };
    if result.is_null() {
        return Err(missing_result(OP));
    }
    let mut n = 0;
    // SAFETY: `result` belongs to the live event.
    let groups = unsafe { rd::rd_kafka_ListConsumerGroupOffsets_result_groups(result, &mut n) };
    let mut offsets = Vec::new();
    for group_result in pointers(groups, n) {
        // SAFETY: `group_result` belongs to the live event.
        let error = unsafe { rd::rd_kafka_group_result_error(group_result) };
        if let Some(error) = result_error(OP, error) {
            return Err(error);
        }
        // SAFETY: as above; the list (and its elements) live as long as the event.
        let list = unsafe { rd::rd_kafka_group_result_partitions(group_result) };
        if list.is_null() {
            continue;
        }
        // SAFETY: `list` is a live partition list of `cnt` elements.
        let elems = unsafe {
            let list = &*list;
            if list.elems.is_null() || list.cnt <= 0 {
                &[][..]
            } else {
                std::slice::from_raw_parts(list.elems, usize::try_from(list.cnt).unwrap_or(0))
            }
        };
        for elem in elems {
            if elem.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                return Err(AdminError::Kafka {
                    operation: OP,
                    code: RDKafkaErrorCode::from(elem.err),
                    message: format!("group {group:?} partition {}", elem.partition),
                });
            }
            // A partition listed without a commit has the invalid offset (-1001).
            if elem.offset < 0 {
                continue;
            }
            let Some(topic) = read_c_str(elem.topic) else {
                continue;
            };
            offsets.push(CommittedOffset {
                topic,
                partition: elem.partition,
                offset: elem.offset,
            });
        }
    }
    Ok(offsets)
}
