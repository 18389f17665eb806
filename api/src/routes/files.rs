//! `/v1/files`: upload, list, read and delete a tenant's files (OpenAI's Files API, for
//! batches). Errors come in OpenAI's envelope, with Sluice's stable code in `code`.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sluice_proto::ErrorCode;
use utoipa::{IntoParams, ToSchema};

use crate::error::ApiError;
use crate::extract::{PathParam, QueryParams};
use crate::files::lines::LineChecker;
use crate::files::{FileObject, Purpose, clean_filename};
use crate::openapi::error_responses;
use crate::principal::Principal;
use crate::routes::openai::OpenAiError;
use crate::state::AppState;

/// The media type of a file's content.
pub const JSONL: &str = "application/jsonl";

/// The multipart form of `POST /v1/files`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct FileUpload {
    /// The JSONL file: one `{"custom_id", "method": "POST", "url": "/v1/chat/completions",
    /// "body"}` per line.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// Must be `batch`.
    #[schema(pattern = "^batch$")]
    purpose: String,
}

/// The answer to a delete.
#[derive(Debug, Serialize, ToSchema)]
pub struct FileDeleted {
    id: String,
    /// Always `file`.
    #[schema(pattern = "^file$")]
    object: &'static str,
    /// Always `true`.
    deleted: bool,
}

/// A page of files.
#[derive(Debug, Serialize, ToSchema)]
pub struct FileList {
    /// Always `list`.
    #[schema(pattern = "^list$")]
    object: &'static str,
    data: Vec<FileObject>,
    #[schema(value_type = Option<String>)]
    first_id: Option<String>,
    #[schema(value_type = Option<String>)]
    last_id: Option<String>,
    has_more: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FileQuery {
    /// Only files of this purpose.
    #[param(inline)]
    purpose: Option<Purpose>,
    /// At most this many (1 to 10,000; default 10,000).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<usize>,
    /// The page after this file id (the previous page's `last_id`).
    after: Option<String>,
    /// Only `desc` (newest first).
    #[param(pattern = "^desc$")]
    order: Option<String>,
}

fn no_such_file() -> ApiError {
    ApiError::client(ErrorCode::NotFound, "no such file")
}

/// The tenant's file, or the 404 (also for another tenant's).
async fn find(state: &AppState, tenant: &str, id: &str) -> Result<FileObject, ApiError> {
    state.files.get(tenant, id).await?.ok_or_else(no_such_file)
}

impl From<multer::Error> for ApiError {
    fn from(e: multer::Error) -> Self {
        match e {
            multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => {
                ApiError::client(ErrorCode::PayloadTooLarge, e.to_string())
            }
            _ => ApiError::client(
                ErrorCode::InvalidRequest,
                format!("the multipart body is malformed: {e}"),
            ),
        }
    }
}

error_responses!(UploadErrors: OpenAi, User, [
    InvalidJson,
    InvalidRequest,
    InvalidParameter,
    UnsupportedParameter,
    ModelNotFound,
    InvalidResponseFormat,
    StorageUnavailable,
]);

/// `POST /v1/files` (multipart: `purpose=batch`, `file`).
#[utoipa::path(
    post,
    path = "/v1/files",
    operation_id = "create_file",
    tag = "files",
    summary = "Upload a batch input file (OpenAI-compatible)",
    description = "A multipart form with `purpose` (`batch`) and `file`: JSONL, one request \
                   per line (`custom_id` unique in the file, `method` `POST`, `url` \
                   `/v1/chat/completions`, `body` a chat completion request checked as that \
                   route checks it). Streamed and checked line by line: the first bad line is \
                   a 400 naming it, and nothing is stored. At most `--files-max-bytes` bytes \
                   (413) and `--files-max-lines` lines.",
    security(("bearer" = [])),
    request_body(content = FileUpload, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The stored file.", body = FileObject),
        UploadErrors,
    ),
)]
pub async fn upload(
    principal: Result<Principal, ApiError>,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, OpenAiError> {
    let principal = principal?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        ApiError::client(
            ErrorCode::UnsupportedMediaType,
            "send the file as multipart/form-data with `purpose` and `file`",
        )
    })?;
    let limits = state.files.limits;
    let constraints = multer::Constraints::new()
        .allowed_fields(vec!["purpose", "file"])
        .size_limit(
            multer::SizeLimit::new()
                .whole_stream(limits.max_bytes + 64 * 1024)
                .for_field("purpose", 64),
        );
    let mut form =
        multer::Multipart::with_constraints(body.into_data_stream(), boundary, constraints);
    let mut purpose: Option<String> = None;
    let mut stored: Option<FileObject> = None;
    let result = async {
        while let Some(field) = form.next_field().await? {
            match field.name() {
                Some("purpose") => {
                    let text = field.text().await?;
                    if text != "batch" {
                        return Err(ApiError::client(
                            ErrorCode::InvalidParameter,
                            format!("purpose must be batch, not {text:?}"),
                        ));
                    }
                    purpose = Some(text);
                }
                Some("file") if stored.is_none() => {
                    let filename = clean_filename(field.file_name());
                    let mut checker = LineChecker::new(
                        &state.codec.name,
                        &state.limits,
                        limits.max_line_bytes,
                        limits.max_lines,
                    );
                    stored = Some(
                        state
                            .files
                            .upload(&principal.tenant, filename, field, &mut checker)
                            .await?,
                    );
                }
                _ => {
                    return Err(ApiError::client(
                        ErrorCode::InvalidRequest,
                        "the form has one `purpose` and one `file`, nothing else",
                    ));
                }
            }
        }
        Ok(())
    }
    .await;
    let outcome = match (result, purpose, &stored) {
        (Err(e), _, _) => Err(e),
        (Ok(()), None, _) => Err(ApiError::client(
            ErrorCode::InvalidRequest,
            "the form has no `purpose` (it must be batch)",
        )),
        (Ok(()), Some(_), None) => Err(ApiError::client(
            ErrorCode::InvalidRequest,
            "the form has no `file`",
        )),
        (Ok(()), Some(_), Some(file)) => Ok(file.clone()),
    };
    match outcome {
        Ok(file) => Ok(Json(file).into_response()),
        Err(e) => {
            // The file arrived whole but the form around it was refused: nothing stays.
            if let Some(file) = stored
                && let Err(cleanup) = state.files.delete(&principal.tenant, &file.id).await
            {
                tracing::warn!(error = %cleanup, file = file.id, "refused upload not removed");
            }
            Err(e.into())
        }
    }
}

error_responses!(ListErrors: OpenAi, User, [InvalidParameter, StorageUnavailable]);

/// `GET /v1/files`.
#[utoipa::path(
    get,
    path = "/v1/files",
    operation_id = "list_files",
    tag = "files",
    summary = "The tenant's files (OpenAI-compatible)",
    description = "Newest first, a page at a time (`after` the previous page's `last_id`).",
    security(("bearer" = [])),
    params(FileQuery),
    responses(
        (status = 200, description = "A page of files.", body = FileList),
        ListErrors,
    ),
)]
pub async fn list(
    principal: Result<Principal, ApiError>,
    State(state): State<AppState>,
    query: Result<QueryParams<FileQuery>, ApiError>,
) -> Result<Json<FileList>, OpenAiError> {
    let principal = principal?;
    let QueryParams(q) = query?;
    let limit = q.limit.unwrap_or(10_000);
    if !(1..=10_000).contains(&limit) {
        return Err(
            ApiError::client(ErrorCode::InvalidParameter, "limit must be 1 to 10000").into(),
        );
    }
    if q.order.as_deref().is_some_and(|o| o != "desc") {
        return Err(ApiError::client(ErrorCode::InvalidParameter, "order must be desc").into());
    }
    let (data, has_more) = state
        .files
        .list(&principal.tenant, q.purpose, q.after.as_deref(), limit)
        .await
        .map_err(ApiError::from)?;
    Ok(Json(FileList {
        object: "list",
        first_id: data.first().map(|f| f.id.clone()),
        last_id: data.last().map(|f| f.id.clone()),
        data,
        has_more,
    }))
}

error_responses!(GetErrors: OpenAi, User, [InvalidParameter, NotFound, StorageUnavailable]);

/// `GET /v1/files/{id}`.
#[utoipa::path(
    get,
    path = "/v1/files/{id}",
    operation_id = "get_file",
    tag = "files",
    summary = "A file's metadata (OpenAI-compatible)",
    description = "Another tenant's file is 404, like a missing one.",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The file's id.")),
    responses(
        (status = 200, description = "The file.", body = FileObject),
        GetErrors,
    ),
)]
pub async fn get(
    principal: Result<Principal, ApiError>,
    State(state): State<AppState>,
    id: Result<PathParam, ApiError>,
) -> Result<Json<FileObject>, OpenAiError> {
    let principal = principal?;
    let PathParam(id) = id?;
    Ok(Json(find(&state, &principal.tenant, &id).await?))
}

/// `GET /v1/files/{id}/content`.
#[utoipa::path(
    get,
    path = "/v1/files/{id}/content",
    operation_id = "get_file_content",
    tag = "files",
    summary = "A file's content (OpenAI-compatible)",
    description = "The JSONL, as uploaded or as the batch wrote it.",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The file's id.")),
    responses(
        (status = 200, description = "The file's lines.", content_type = "application/jsonl", body = String),
        GetErrors,
    ),
)]
pub async fn content(
    principal: Result<Principal, ApiError>,
    State(state): State<AppState>,
    id: Result<PathParam, ApiError>,
) -> Result<Response, OpenAiError> {
    let principal = principal?;
    let PathParam(id) = id?;
    let file = find(&state, &principal.tenant, &id).await?;
    let stream = match state.files.content(&principal.tenant, &file.id).await {
        Ok(stream) => stream,
        Err(crate::files::FileError::Objects(object_store::Error::NotFound { .. })) => {
            return Err(no_such_file().into());
        }
        Err(e) => return Err(ApiError::from(e).into()),
    };
    Ok((
        [
            (header::CONTENT_TYPE, JSONL.to_string()),
            (header::CONTENT_LENGTH, file.bytes.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

error_responses!(DeleteErrors: OpenAi, User, [InvalidParameter, NotFound, StorageUnavailable]);

/// `DELETE /v1/files/{id}`.
#[utoipa::path(
    delete,
    path = "/v1/files/{id}",
    operation_id = "delete_file",
    tag = "files",
    summary = "Delete a file (OpenAI-compatible)",
    description = "A batch already running keeps the lines it read; one still `validating` \
                   fails.",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The file's id.")),
    responses(
        (status = 200, description = "Deleted.", body = FileDeleted),
        DeleteErrors,
    ),
)]
pub async fn delete(
    principal: Result<Principal, ApiError>,
    State(state): State<AppState>,
    id: Result<PathParam, ApiError>,
) -> Result<Json<FileDeleted>, OpenAiError> {
    let principal = principal?;
    let PathParam(id) = id?;
    if !state
        .files
        .delete(&principal.tenant, &id)
        .await
        .map_err(ApiError::from)?
    {
        return Err(no_such_file().into());
    }
    Ok(Json(FileDeleted {
        id,
        object: "file",
        deleted: true,
    }))
}
