/**
 * Combines the device's data with the version another device uploaded, when both changed since
 * they last synced. `base` is the data both started from (the last data this device synced),
 * when the client has it: in memory, or from the service's version history; `undefined` when
 * that version is no longer kept. It may return any of them or a new value; it must not throw
 * for data it has seen before (a throw ends the sync, and nothing is uploaded).
 */
export type Merge<T> = (local: T, remote: T, base: T | undefined) => T | Promise<T>

function isPlainObject (value: unknown): value is Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return false
  const prototype = Object.getPrototypeOf(value)
  return prototype === Object.prototype || prototype === null
}

function setOwn (target: Record<string, unknown>, key: string, value: unknown): void {
  // defineProperty, not assignment: a "__proto__" key in parsed JSON stays a plain key.
  Object.defineProperty(target, key, { value, enumerable: true, writable: true, configurable: true })
}

const same = (a: unknown, b: unknown) => JSON.stringify(a) === JSON.stringify(b)

/**
 * The default merge, a three-way one that loses no change of either side but where both changed
 * the same value, and nothing at all the other device uploaded:
 * - objects: every key of both sides; keys on both sides are merged the same way;
 * - arrays: the remote items, then the local items the remote side lacks (compared as JSON);
 * - any other value (a number, a string, an object against a number): the side that changed it
 *   since `base`; if both did, or without a base, the remote one (the other device uploaded it
 *   first); a remote null or undefined keeps the local value.
 * Nothing is deleted by it: a key or item one device removed comes back if the other has it.
 * Apps whose data has rules of its own (highest score, latest change per item) pass a merge.
 */
export function unionMerge<T> (local: T, remote: T, base?: T): T {
  return mergeValues(local, remote, base) as T
}

function mergeValues (local: unknown, remote: unknown, base: unknown): unknown {
  if (remote === null || remote === undefined) return local
  if (isPlainObject(local) && isPlainObject(remote)) {
    const baseObject = isPlainObject(base) ? base : {}
    const merged: Record<string, unknown> = {}
    for (const [key, value] of Object.entries(remote)) {
      setOwn(merged, key, Object.hasOwn(local, key)
        ? mergeValues(local[key], value, Object.hasOwn(baseObject, key) ? baseObject[key] : undefined)
        : value)
    }
    for (const [key, value] of Object.entries(local)) {
      if (!Object.hasOwn(remote, key)) setOwn(merged, key, value)
    }
    return merged
  }
  if (Array.isArray(local) && Array.isArray(remote)) {
    const present = new Set(remote.map((item) => JSON.stringify(item)))
    return [...remote, ...local.filter((item) => !present.has(JSON.stringify(item)))]
  }
  if (base !== undefined && same(remote, base)) return local
  return remote
}
