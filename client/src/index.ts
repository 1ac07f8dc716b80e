export { SyncClient, type SyncClientOptions, type SyncState, type VersionInfo } from './client.ts'
export {
  generateKey, exportKey, importKey, newUserId, pairingCode, readPairingCode, deriveAccessToken, type WireRecord
} from './crypto.ts'
export { unionMerge, type Merge } from './merge.ts'
export {
  SyncError, UnavailableError, RateLimitError, UnauthorizedError, ConflictError, NotFoundError, TooLargeError,
  IntegrityError, RequestError, ServerError, type SyncErrorKind
} from './errors.ts'
