/**
 * Combines the device's data with the version another device uploaded, when both changed since
 * they last synced. It may return either argument or a new value; it must not throw for data it
 * has seen before (a throw ends the sync, and nothing is uploaded).
 */
export type Merge<T> = (local: T, remote: T) => T | Promise<T>

function isPlainObject (value: unknown): value is Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return false
  const prototype = Object.getPrototypeOf(value)
  return prototype === Object.prototype || prototype === null
}

function setOwn (target: Record<string, unknown>, key: string, value: unknown): void {
  // defineProperty, not assignment: a "__proto__" key in parsed JSON stays a plain key.
  Object.defineProperty(target, key, { value, enumerable: true, writable: true, configurable: true })
}

/**
 * The default merge, which loses nothing the other device uploaded:
 * - objects: every key of both sides; keys on both sides are merged the same way;
 * - arrays: the remote items, then the local items the remote side lacks (compared as JSON);
 * - anything else that differs (two numbers, two strings, an object against a number): the
 *   remote value, the one the other device uploaded first; but a remote null or undefined
 *   keeps the local value (there is nothing there to keep).
 * Nothing is deleted by it: an item one device removed comes back if the other still has it.
 * Apps whose data has rules of its own (highest score, latest edit per item) pass a merge.
 */
export function unionMerge<T> (local: T, remote: T): T {
  if (remote === null || remote === undefined) return local
  if (isPlainObject(local) && isPlainObject(remote)) {
    const merged: Record<string, unknown> = {}
    for (const [key, value] of Object.entries(remote)) {
      setOwn(merged, key, Object.hasOwn(local, key) ? unionMerge(local[key], value) : value)
    }
    for (const [key, value] of Object.entries(local)) {
      if (!Object.hasOwn(remote, key)) setOwn(merged, key, value)
    }
    return merged as T
  }
  if (Array.isArray(local) && Array.isArray(remote)) {
    const present = new Set(remote.map((item) => JSON.stringify(item)))
    return [...remote, ...local.filter((item) => !present.has(JSON.stringify(item)))] as T
  }
  return remote
}
