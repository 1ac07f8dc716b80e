import { Type, type Static } from '@sinclair/typebox'

/** Every error the service sends: clients show `error` to the user. */
export const ErrorSchema = Type.Object({
  error: Type.String({ description: 'what went wrong, in words a person can read' }),
  statusCode: Type.Integer()
})
export type ErrorBody = Static<typeof ErrorSchema>
